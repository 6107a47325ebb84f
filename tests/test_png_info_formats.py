"""PNG Info on other tools' images: real files from each tool (tests/fixtures/png_info/README.md names their
origin and licence), each bad case the issue found, and this app's own PNGs read back by A1111's rules."""

import gzip
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from backend import Capabilities
from backend.core import image_info
from backend.core.image_info import (EXIF_IFD, USER_COMMENT, NoSettings, NotAnImage, read_image_info, text_chunks,
                                     user_comment)
from backend.core.metadata import attach, png_bytes, write_infotext
from ui.pnginfo import PngInfoError, png_info, send_note, values_for_controls

FIXTURES = Path(__file__).parent / "fixtures" / "png_info"
CAPS = Capabilities(backend="local", model="tiny", device="cpu", precisions=("fp32",))

# file: tool, prompt (start), negative prompt (start), steps, seed, CFG scale; values from each file's own
# chunks (and sd-parsers' expected results for the same files, tests/resources/parsers/*/*.py).
REAL_FILES = {
    "automatic1111_cropped.png": ("AUTOMATIC1111", "photo of a duck", "monochrome", "15", "235284042", "5"),
    "automatic1111_cropped.jpg": ("AUTOMATIC1111", "photo of a duck", "monochrome", "15", "235284042", "5"),
    "img2img_cropped.png": ("ComfyUI", "photograph of victorian woman with wings", "watermark, text", "20",
                            "280823642470253", "8"),
    "unclip_2pass_cropped.png": ("ComfyUI", "(waifu, anime, exceptional", "lowres, (bad anatomy)", "26",
                                 "1106257833005336", "8"),
    "noisy_latents_3_subjects_cropped.png": ("ComfyUI", "(solo) girl (flat chest:0.9)", "(hands), text, error",
                                             "16", "890421140397575", "7"),
    "fooocus1_cropped.png": ("Fooocus", "a smiling goldfish", "", "30", "6952411511246973023", "4"),
    "invokeai_dream1.png": ("InvokeAI", "professional full body photo of young woman",
                            "rendering, glowing eyes, skinny", "50", "2980747362", "5"),
    "invokeai_sdmeta1.png": ("InvokeAI", "professional full body photo of young woman",
                             "rendering, glowing eyes, skinny", "50", "2980747362", "5"),
    "invokeai_imeta1.png": ("InvokeAI", "digital artwork, oil painting", "grainy+, photo, oversaturated", "35",
                            "3293022630", "8"),
    "novelai1_cropped.png": ("NovelAI", "masterpiece, best quality,  cat, space, icon", "lowres, bad anatomy",
                             "50", "2253955223", "10"),
    # sd-metadata's samples (the README names each tool and version): one prompt written in every tool.
    **{name: (tool, "general, masterpiece, best quality", "bad quality, worst quality", *numbers)
       for name, tool, *numbers in (
        ("swarmui.png", "SwarmUI", "20", "2083100758", "7"),
        ("ruined-fooocus.png", "RuinedFooocus", "30", "2020047614", "8"),
        ("huggingface-space.png", "Hugging Face Space", "24", "443800072", "5.5"),
        ("stability-matrix.png", "Stability Matrix", "20", "395309383", "5"),
        ("invokeai.png", "InvokeAI", "24", "3951921344", "6"),
        ("sd-webui.webp", "AUTOMATIC1111", "20", "1028435836", "5.5"),
        ("sd-webui-hires.png", "AUTOMATIC1111", "20", "3888671826", "5.5"),
        ("forge.png", "AUTOMATIC1111", "25", "747066619", "5"),
        ("civitai-hires.jpg", "ComfyUI", "25", "1311178179", "5"),
        ("civitai-upscale.jpg", "Civitai", "25", "1311178179", "5"),
        ("comfyui-anima.png", "ComfyUI", "24", "662066908990052", "5"),
        ("comfyui-comfyroll.png", "ComfyUI", "30", "942975376742792", "6"),
        ("comfyui-save-image-extended.jpeg", "ComfyUI", "20", "813617545434765", "5"),
        ("comfyui-saveimage-plus.webp", "ComfyUI", "20", "453851843419278", "5"),
    )},
    "novelai-full-3char.png": ("NovelAI", "2girls, 1boy, dancing, #テスト\nwhite background", "nsfw, lowres",
                               "28", "1702945580", "5"),
    "novelai-full-3char.webp": ("NovelAI", "2girls, 1boy, dancing, #テスト\nwhite background", "nsfw, lowres",
                                "28", "447042893", "5"),
}


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_files_from_each_tool(name):
    tool, prompt, negative, steps, seed, cfg = REAL_FILES[name]
    result = png_info((FIXTURES / name).read_bytes())
    p = result["parameters"]
    assert result["tool"].startswith(tool)
    assert p["Prompt"].startswith(prompt) and p["Negative prompt"].startswith(negative)
    assert (p["Steps"], p["Seed"], p["CFG scale"]) == (steps, seed, cfg)
    # The infotext shown (and sent) carries the same fields: Send reads it back.
    sent = values_for_controls(result["info"], CAPS)
    assert sent.values["prompt"] == p["Prompt"] and sent.values["steps"] == int(steps)
    assert sent.values["guidance_scale"] == float(cfg)
    if int(seed) < 2**32:
        assert sent.values["seed"] == int(seed)
    else:  # ComfyUI and Fooocus seeds are 64-bit; this app's are 32: Send says so and leaves the seed
        assert "seed" not in sent.values and any(n.startswith("Seed:") for n in sent.notes)


def test_a_comfyui_graph_with_several_samplers_reads_the_first_pass_and_says_so():
    result = png_info((FIXTURES / "noisy_latents_3_subjects_cropped.png").read_bytes())
    assert result["parameters"]["Size"] == "256x512"  # the first pass's EmptyLatentImage, not the upscale's
    assert "6 sampler nodes" in result["notes"][0] and "DPM++ SDE is not one this app has" in result["notes"][1]
    assert "{" not in result["parameters"]["Prompt"]  # never the graph pasted as a prompt


def test_a1111_jpeg_sampler_size_and_the_a1111_api_keys():
    p = png_info((FIXTURES / "automatic1111_cropped.jpg").read_bytes())["parameters"]
    assert (p["Sampler"], p["Size-1"], p["Size-2"], p["Model"]) == ("UniPC", "512", "400",
                                                                    "realistic_realisticVisionV20_v20")


def test_consecutive_parses_of_different_files_cannot_leak():
    # The hazard sd-parsers 0.6 has (a module-global cache keyed by id(image)): alternate files, same ids likely.
    names = list(REAL_FILES)
    expected = {n: png_info((FIXTURES / n).read_bytes())["parameters"]["Seed"] for n in names}
    for _ in range(3):
        for name in names:
            assert png_info((FIXTURES / name).read_bytes())["parameters"]["Seed"] == expected[name]


# --- the bad cases the issue found, each built as the tool writes it ---------------------------------------------

def png_with(chunks: dict[str, str], *, raw_text: dict[str, bytes] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    for key, value in (raw_text or {}).items():
        info.add(b"tEXt", key.encode("latin-1") + b"\0" + value)
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def with_user_comment(fmt: str, comment: bytes) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = comment
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, fmt, exif=exif.tobytes())
    return buf.getvalue()


A1111 = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512"


@pytest.mark.parametrize("fmt,encoding", [("WEBP", "utf-16-le"), ("WEBP", "utf-16-be"), ("JPEG", "utf-16-be")])
def test_a1111_jpeg_and_webp_user_comment_either_byte_order(fmt, encoding):
    text = A1111.replace("a cat", "une chatte café ✨")
    result = png_info(with_user_comment(fmt, b"UNICODE\0" + text.encode(encoding)))
    assert result["info"] == text and result["parameters"]["Prompt"] == "une chatte café ✨"
    assert result["parameters"]["Steps"] == "20" and result["tool"].startswith("AUTOMATIC1111")


def test_an_empty_prompt_is_only_the_parameters_line():
    p = png_info(png_with({"parameters": "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512"}))[
        "parameters"]
    assert p["Prompt"] == "" and p["Steps"] == "20" and p["Seed"] == "5"


def test_utf8_in_a_text_chunk_is_not_mojibake():
    text = A1111.replace("a cat", "一只可爱的猫, café")
    result = png_info(png_with({}, raw_text={"parameters": text.encode("utf-8")}))
    assert result["parameters"]["Prompt"] == "一只可爱的猫, café"


def test_keys_in_another_case_are_read():
    p = png_info(png_with({"parameters": "a cat\nSteps: 20, Sampler: Euler, CFG Scale: 6.5, seed: 9"}))["parameters"]
    assert (p["CFG scale"], p["Seed"]) == ("6.5", "9")
    assert values_for_controls(A1111.replace("CFG scale", "CFG Scale"), CAPS).values["guidance_scale"] == 7.0


JSON_TOOLS = {
    # SwarmUI: src/Text2Image/T2IParamTypes.cs names, under sui_image_params.
    "SwarmUI": {"sui_image_params": {"prompt": "a cat", "negativeprompt": "dog", "model": "sdxl", "seed": 5,
                                     "steps": 20, "cfgscale": 7, "width": 1024, "height": 1024,
                                     "sampler": "euler_ancestral", "scheduler": "karras"},
                "sui_extra_data": {"date": "2024-05-01"}},
    # RuinedFooocus: modules/imagesave.py.
    "RuinedFooocus": {"Prompt": "a cat", "Negative": "dog", "steps": 20, "cfg": 7, "width": 1024, "height": 1024,
                      "seed": 5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "base_model_name": "m",
                      "software": "RuinedFooocus"},
    # A Space saving its diffusers call's arguments.
    "Hugging Face Space": {"prompt": "a cat", "negative_prompt": "dog", "num_inference_steps": 20,
                           "guidance_scale": 7, "seed": 5, "width": 512, "height": 512},
}


@pytest.mark.parametrize("tool", JSON_TOOLS)
def test_json_in_parameters_is_read_not_pasted_as_the_prompt(tool):
    result = png_info(png_with({"parameters": json.dumps(JSON_TOOLS[tool])}))
    p = result["parameters"]
    assert result["tool"].startswith(tool)
    assert (p["Prompt"], p["Negative prompt"], p["Steps"], p["Seed"], p["CFG scale"]) == ("a cat", "dog", "20", "5",
                                                                                           "7")


def test_not_an_image_and_no_settings_are_clear_messages():
    with pytest.raises(NotAnImage):
        read_image_info(b"not a picture")
    with pytest.raises(NoSettings):
        read_image_info(png_with({}))
    with pytest.raises(PngInfoError, match="cannot be read as an image"):
        png_info(b"not a picture")
    with pytest.raises(PngInfoError, match="no generation settings"):
        png_info(png_with({"Software": "GIMP"}))
    with pytest.raises(PngInfoError, match="no generation settings"):
        png_info(png_with({"parameters": '["a list"]'}))


def test_a_decompression_bomb_is_a_clear_message(monkeypatch):
    # PIL refuses an image of over twice MAX_IMAGE_PIXELS with its own exception, no OSError: a 1-pixel PNG
    # against a limit lowered below it stands in for a small file that decodes to gigapixels.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 0.2)
    with pytest.raises(PngInfoError, match="too large to read"):
        png_info(png_with({"parameters": "a cat\nSteps: 20, Seed: 5"}))


def test_a_sampler_this_app_lacks_and_a_hires_pass_are_named_in_the_notes():
    result = png_info((FIXTURES / "fooocus1_cropped.png").read_bytes())
    assert result["notes"] == ["Sampler DPM++ 2M SDE Karras is not one this app has; Send leaves the scheduler "
                               "as it is."]
    result = png_info(png_with({"parameters": A1111 + ", Refiner: sdxl_refiner, Clip skip: 2"}))
    assert result["notes"] == ["Not available here: Refiner: sdxl_refiner, Clip skip: 2."]


def test_a_parameters_text_without_a_settings_line_is_the_prompt_with_a_note():
    result = png_info(png_with({"parameters": "just a prompt, nothing else"}))
    assert result["parameters"]["Prompt"] == "just a prompt, nothing else"
    assert "no settings line" in result["notes"][0]


def test_send_names_the_settings_it_cannot_run():
    sent = values_for_controls(A1111 + ", Refiner: sdxl_refiner, Refiner switch at: 0.8, Clip skip: 2", CAPS)
    assert sent.values["steps"] == 20
    assert sent.notes == ["Not available here, so not sent: Refiner: sdxl_refiner, Refiner switch at: 0.8, "
                          "Clip skip: 2."]


# --- this app's PNGs, read back by a third-party reader: A1111's own rules --------------------------------------

# AUTOMATIC1111's parse_generation_parameters (modules/infotext_utils.py, v1.10.1), its core copied as written:
# the parameters line needs three "Key: value" pairs; "Negative prompt:" starts the negative prompt; quoted
# values are JSON strings; Size becomes Size-1 and Size-2.
A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_parse(x: str) -> dict:
    res = {}
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(A1111_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for k, v in A1111_RE_PARAM.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            v = json.loads(v)
        m = A1111_RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


@pytest.mark.parametrize("prompt,negative", [("a lovely cat", "blurry"), ("一只可爱的猫 ✨", ""), ("café", "naïve"),
                                             ("line one\nline two", "a, b: c"), ("", "dog")])
def test_this_apps_pngs_read_back_in_the_tab_and_by_a1111s_rules(prompt, negative):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    params = {"Steps": 9, "Sampler": "Euler a", "CFG scale": "7.5", "Seed": 77, "Size": "128x64",
              "Model": 'a, "b": c', "Mode": "img2img", "Denoising strength": "0.4"}
    text = write_infotext(prompt, negative, params)
    for data in (png_bytes(attach(image, text)), png_bytes(attach(image, text), compress_level=6)):
        result = png_info(data)
        assert result["info"] == text and result["tool"].startswith("AUTOMATIC1111")
        theirs = a1111_parse(Image.open(io.BytesIO(data)).text["parameters"])
        ours = result["parameters"]
        assert (ours["Prompt"], ours["Negative prompt"]) == (prompt, negative)
        assert {k: theirs[k] for k in ("Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Seed",
                                       "Size-1", "Size-2", "Model", "Denoising strength")} == {
            k: ours[k] for k in ("Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Seed", "Size-1",
                                 "Size-2", "Model", "Denoising strength")}


def test_a_comfyui_saver_writing_a1111_parameters_is_read_from_them():
    # ComfyUI-Image-Saver and similar savers write an A1111 infotext beside the graph: it is the saver's own summary.
    graph = (FIXTURES / "img2img_cropped.png")
    with Image.open(graph) as image:
        chunks = {"prompt": image.info["prompt"], "workflow": image.info["workflow"], "parameters": A1111}
    result = png_info(png_with(chunks))
    assert result["tool"] == "ComfyUI (an A1111-style saver)" and result["info"] == A1111
    assert set(result["items"]) == {"prompt", "workflow"}


@pytest.mark.parametrize("zip_", [True, False])
def test_a1111_parameters_in_ztxt_and_itxt(zip_):
    info = PngImagePlugin.PngInfo()
    if zip_:
        info.add_text("parameters", A1111, zip=True)  # Latin-1 text, compressed: zTXt
    else:
        info.add_itxt("parameters", A1111)
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG", pnginfo=info)
    assert (b"zTXt" if zip_ else b"iTXt") in buf.getvalue()
    assert png_info(buf.getvalue())["parameters"]["Prompt"] == "a cat"


# --- NovelAI V4, stealth metadata in the pixels, the sd-metadata samples' particular cases ----------------------

def test_novelai_v4_reads_the_base_caption_and_names_the_character_prompts():
    for name in ("novelai-full-3char.png", "novelai-full-3char.webp"):  # the WebP: every chunk in UserComment
        result = png_info((FIXTURES / name).read_bytes())
        p = result["parameters"]
        with Image.open(FIXTURES / name) as image:
            comment = json.loads(text_chunks(image)["Comment"])
        assert p["Prompt"] == comment["v4_prompt"]["caption"]["base_caption"]  # not NovelAI's NUL-led Description
        assert p["Negative prompt"] == comment["v4_negative_prompt"]["caption"]["base_caption"]
        assert p["Sampler"] == "Euler a" and p["Size"] == "1024x1024"
        assert result["notes"][0] == ("NovelAI V4 character prompts (placed by position), which this app has no place "
                                      "for; not sent: 1: girl, hatsune miku, spread arms; 2: girl, kagamine rin, "
                                      "hand up; 3: boy, kagamine len, hand up.")
    old = png_info((FIXTURES / "novelai1_cropped.png").read_bytes())  # before V4: no v4_prompt, no such note
    assert not any("V4" in n for n in old["notes"])


def without_text_chunks(name: str) -> bytes:
    """A fixture's pixels as they are (alpha and all), saved again with no text chunk."""
    with Image.open(FIXTURES / name) as image:
        buf = io.BytesIO()
        image.save(buf, "PNG")
    assert b"tEXt" not in buf.getvalue() and b"iTXt" not in buf.getvalue()
    return buf.getvalue()


def test_stealth_metadata_in_the_alpha_channel_of_real_images():
    # Forge writes the infotext gzipped in the alpha channel's lowest bits beside its text chunk: the same text.
    with Image.open(FIXTURES / "forge.png") as image:
        infotext = image.text["parameters"]
    assert not any("pixels" in n for n in png_info((FIXTURES / "forge.png").read_bytes())["notes"])  # chunk first
    result = png_info(without_text_chunks("forge.png"))
    assert result["info"] == infotext and result["tool"].startswith("AUTOMATIC1111")
    assert result["notes"][0].startswith("Read from the image's pixels (stealth_pngcomp in the lowest bits of the "
                                         "alpha channel)")
    # NovelAI writes its chunks there, as one JSON object: read as the chunks would be.
    hidden = png_info(without_text_chunks("novelai-full-3char.png"))
    from_chunks = png_info((FIXTURES / "novelai-full-3char.png").read_bytes())
    assert hidden["tool"] == "NovelAI" and hidden["parameters"] == from_chunks["parameters"]
    assert hidden["notes"][1:] == from_chunks["notes"]


def stealth_image(text: str, signature: str, size=(40, 30), payload: bytes | None = None,
                  length: int | None = None) -> bytes:
    """An image with stealth metadata as the stealth-pnginfo extension writes it (scripts/stealth_pnginfo.py,
    prepare_data and add_data): signature, payload length in bits (32 bits), payload; column by column, in the
    alpha's lowest bit (alpha set to 255 first), or R, G and B's in turn."""
    alpha = signature.startswith("stealth_png")
    payload = payload if payload is not None else (
        gzip.compress(text.encode()) if signature.endswith("comp") else text.encode())
    bits = "".join(format(b, "08b") for b in signature.encode()) + format(
        length if length is not None else len(payload) * 8, "032b") + "".join(format(b, "08b") for b in payload)
    width, height = size
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, 4 if alpha else 3), dtype=np.uint8)
    if alpha:
        pixels[..., 3] = 255
    columns = pixels.transpose(1, 0, 2).copy()  # x outer, y inner, as the extension walks them
    flat = columns[..., 3].reshape(-1) if alpha else columns.reshape(-1)
    n = min(len(bits), len(flat))
    flat[:n] = (flat[:n] & 0xFE) | np.array([int(b) for b in bits[:n]], dtype=np.uint8)
    if alpha:
        columns[..., 3] = flat.reshape(width, height)
    else:
        columns = flat.reshape(width, height, 3)
    buf = io.BytesIO()
    Image.fromarray(columns.transpose(1, 0, 2).copy()).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("signature", ["stealth_pnginfo", "stealth_pngcomp", "stealth_rgbinfo", "stealth_rgbcomp"])
def test_stealth_metadata_each_signature(signature):
    text = A1111.replace("a cat", "une chatte café ✨")
    result = png_info(stealth_image(text, signature))
    assert result["info"] == text and result["parameters"]["Prompt"] == "une chatte café ✨"
    assert signature in result["notes"][0]
    assert ("alpha channel" if "png" in signature else "RGB channels") in result["notes"][0]


def test_a_text_chunk_wins_over_stealth_metadata():
    data = stealth_image(A1111.replace("a cat", "hidden"), "stealth_pngcomp")
    with Image.open(io.BytesIO(data)) as image:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", A1111)
        buf = io.BytesIO()
        image.save(buf, "PNG", pnginfo=info)
    result = png_info(buf.getvalue())
    assert result["parameters"]["Prompt"] == "a cat" and result["notes"] == []


def test_hostile_stealth_metadata_is_bounded_and_refused(monkeypatch):
    with pytest.raises(PngInfoError, match="no generation settings"):  # a length past the pixels there are
        png_info(stealth_image(A1111, "stealth_pnginfo", length=8 * 10**6))
    # The caps, lowered so that a small image shows them: a payload past STEALTH_MAX_PAYLOAD is not read
    # (however many pixels hold it), and gzip that would inflate past STEALTH_MAX_TEXT is stopped there.
    small, packed = stealth_image(A1111, "stealth_pnginfo"), stealth_image(A1111, "stealth_pngcomp")
    assert png_info(small)["info"] == png_info(packed)["info"] == A1111
    monkeypatch.setattr(image_info, "STEALTH_MAX_PAYLOAD", len(A1111) - 1)
    with pytest.raises(PngInfoError, match="no generation settings"):
        png_info(small)
    monkeypatch.setattr(image_info, "STEALTH_MAX_TEXT", len(A1111) - 1)
    with pytest.raises(PngInfoError, match="no generation settings"):
        png_info(packed)
    monkeypatch.undo()
    with pytest.raises(PngInfoError, match="no generation settings"):  # gzip that is not
        png_info(stealth_image("", "stealth_pngcomp", payload=b"not gzip at all"))
    with pytest.raises(PngInfoError, match="no generation settings"):  # a signature only half there
        png_info(stealth_image(A1111, "stealth_pngcomp", size=(3, 3)))


def test_consecutive_stealth_reads_cannot_leak():
    # sd-parsers 0.6 caches alpha extraction by id(image); nothing here is kept between reads.
    images = {f"prompt {i}": stealth_image(A1111.replace("a cat", f"prompt {i}"), "stealth_pngcomp") for i in range(4)}
    plain = png_with({})
    for _ in range(3):
        for prompt, data in images.items():
            assert png_info(data)["parameters"]["Prompt"] == prompt
            with pytest.raises(PngInfoError):
                png_info(plain)


def test_a1111_hires_pass_of_a_real_image_is_read():
    p = png_info((FIXTURES / "sd-webui-hires.png").read_bytes())["parameters"]
    assert (p["Hires upscale"], p["Hires steps"], p["Denoising strength"], p["Size"]) == ("1.5", "10", "0.3",
                                                                                          "1024x1024")


def test_civitai_graph_agrees_with_civitais_own_summary():
    # Civitai's generator writes a ComfyUI graph in UserComment, with its own summary in "extraMetadata".
    result = png_info((FIXTURES / "civitai-hires.jpg").read_bytes())
    with Image.open(FIXTURES / "civitai-hires.jpg") as image:
        summary = json.loads(json.loads(user_comment(image))["extraMetadata"])
    p = result["parameters"]
    assert (p["Prompt"], p["Negative prompt"]) == (summary["prompt"].strip(), summary["negativePrompt"].strip())
    assert (int(p["Steps"]), int(p["Seed"]), float(p["CFG scale"])) == (summary["steps"], summary["seed"],
                                                                        summary["cfgScale"])


def test_a_comfyui_seed_wired_from_another_node_is_read():
    with Image.open(FIXTURES / "comfyui-comfyroll.png") as image:
        graph = json.loads(image.text["prompt"])
    assert graph["95"]["class_type"] == "CR Seed"
    assert png_info((FIXTURES / "comfyui-comfyroll.png").read_bytes())["parameters"]["Seed"] == str(
        graph["95"]["inputs"]["seed"])


def test_send_keeps_the_reading_notes_and_adds_its_own():
    result = png_info((FIXTURES / "novelai-full-3char.png").read_bytes())
    reading = " ".join([f"Made by {result['tool']}.", *result["notes"]])
    sent = values_for_controls(result["info"], CAPS)
    assert sent.notes == []  # everything else fits this backend
    assert send_note(reading, "Text to image", result["info"], sent.notes) == f"{reading}\n\n**Sent to text to image.**"
    # Fooocus: a 64-bit seed Send cannot take, said; a sampler this app lacks, said by reading and not again.
    fooocus = png_info((FIXTURES / "fooocus1_cropped.png").read_bytes())
    reading = " ".join([f"Made by {fooocus['tool']}.", *fooocus["notes"]])
    sent = values_for_controls(fooocus["info"], CAPS)
    assert any(n.startswith("Sampler: DPM++ 2M SDE Karras is not offered") for n in sent.notes)
    seed = next(n for n in sent.notes if n.startswith("Seed:"))
    assert seed == "Seed: 6952411511246973023 is outside what this backend takes (-1 to 4294967295); left as it was."
    kept = " ".join(n for n in sent.notes if not n.startswith("Sampler:"))
    assert seed in kept and send_note(reading, "Text to image", fooocus["info"], sent.notes) == (
        f"{reading}\n\n**Sent to text to image.** {kept}")
    # A pasted infotext has no reading note, and nothing to send says only that.
    assert send_note("", "Text to image", A1111, ["x."]) == "x."
    assert send_note(reading, "Text to image", "", ["There are no settings to send."]) == \
        "There are no settings to send."


def test_comfyui_custom_sampler_reads_the_nodes_wired_to_it():
    # SamplerCustomAdvanced: seed from RandomNoise, CFG and prompts from CFGGuider, sampler from KSamplerSelect,
    # steps and schedule from BasicScheduler; a size written as text by rgthree's latent node.
    result = png_info((FIXTURES / "comfyui-anima.png").read_bytes())
    p = result["parameters"]
    assert (p["Sampler"], p["Size"], p["Model"]) == ("Euler", "1216x832", "anima-preview.safetensors")
    assert "2 sampler nodes" in result["notes"][0] and "scheduler 'beta'" in result["notes"][1]


def test_a_civitai_upscale_reads_civitais_summary_and_says_so():
    result = png_info((FIXTURES / "civitai-upscale.jpg").read_bytes())
    assert result["notes"][0].startswith("Civitai: the file's ComfyUI graph only post-processes")
    assert (result["parameters"]["Size"], result["parameters"]["Clip skip"]) == ("1024x1024", "2")
