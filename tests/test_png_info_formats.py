"""PNG Info on other tools' images: real files from each tool (tests/fixtures/png_info/README.md names their
origin and licence), each bad case the issue found, and this app's own PNGs read back by A1111's rules."""

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from backend import Capabilities
from backend.core.image_info import EXIF_IFD, USER_COMMENT, NoSettings, NotAnImage, read_image_info
from backend.core.metadata import attach, png_bytes, write_infotext
from ui.pnginfo import PngInfoError, png_info, values_for_controls

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


def test_a_sampler_this_app_lacks_and_a_hires_pass_are_named_in_the_notes():
    result = png_info((FIXTURES / "fooocus1_cropped.png").read_bytes())
    assert result["notes"] == ["Sampler DPM++ 2M SDE Karras is not one this app has; Send leaves the scheduler "
                               "as it is."]
    result = png_info(png_with({"parameters": A1111 + ", Hires upscale: 2, Hires steps: 10"}))
    assert result["notes"] == ["Not available here: Hires upscale: 2, Hires steps: 10."]


def test_a_parameters_text_without_a_settings_line_is_the_prompt_with_a_note():
    result = png_info(png_with({"parameters": "just a prompt, nothing else"}))
    assert result["parameters"]["Prompt"] == "just a prompt, nothing else"
    assert "no settings line" in result["notes"][0]


def test_send_names_the_hires_pass_it_cannot_run():
    sent = values_for_controls(A1111 + ", Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent", CAPS)
    assert sent.values["steps"] == 20
    assert sent.notes == ["Not available here, so not sent: Hires upscale: 2, Hires steps: 10, "
                          "Hires upscaler: Latent."]


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
