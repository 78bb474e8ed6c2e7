"""FID (Inception-v3 features) and CLIP score from torchmetrics / torch-fidelity, offline, on tiny random networks
loaded the way users load the real ones: a random Inception-v3 of the real architecture saved as a .pth (the
--fid-weights path) and a tiny transformers CLIP saved with save_pretrained (the --clip-model path)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.cli import main
from ldmkit.data import synth
from ldmkit.errors import UserError
from ldmkit.eval import metrics


@pytest.fixture(autouse=True)
def small_inception_input(monkeypatch):
    """Seconds instead of minutes on a CPU, the same weights file, network and code path: images resized to 75 px
    (the smallest its layers take) instead of 299, and FID on its first 64-d features instead of pool3's 2048
    (torchmetrics' feature=64), whose 2048x2048 float64 eigenvalue problem takes seconds per FID."""
    metrics._torch_fidelity()
    from torchmetrics.image.fid import NoTrainInceptionV3

    monkeypatch.setattr(NoTrainInceptionV3, "INPUT_IMAGE_SIZE", 75)
    monkeypatch.setattr(metrics, "FID_FEATURES", 64)


@pytest.fixture(scope="module")
def inception_pth(tmp_path_factory):
    """torch-fidelity's Inception-v3 (the FID network) with random He-initialised convs (so that features keep
    their scale through its 94 layers), saved as a state dict like weights-inception-2015-12-05-6726825d.pth."""
    metrics._torch_fidelity()
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    mp = pytest.MonkeyPatch()
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)  # nothing to load yet
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("fid") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ldmkit.models.tiny import byte_tokenizer, byte_vocab

    n = len(byte_vocab())
    text = dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    text.update(max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32)
    config = CLIPConfig(text_config=text, vision_config=dict(vision, patch_size=8), projection_dim=16)
    torch.manual_seed(2)  # a seed whose mean cos on the test's pairs is positive (see the test)
    folder = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(config).save_pretrained(folder)
    size = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=CLIPImageProcessor(**size), tokenizer=byte_tokenizer()).save_pretrained(folder)
    return folder


def _images(n: int, seed: int, shift: int = 0) -> list[Image.Image]:
    rs = np.random.RandomState(seed)
    return [
        Image.fromarray(np.clip(rs.randint(0, 200, (16, 16, 3)) + shift, 0, 255).astype(np.uint8)) for _ in range(n)
    ]


def test_fid_of_a_set_to_itself_is_zero_and_to_a_shifted_set_positive(inception_pth):
    fid = metrics.InceptionFID(inception_pth)
    a, b = _images(4, 0), _images(4, 1, shift=55)
    same = fid(a, a)
    shifted = fid(b, a)
    assert np.isfinite(same) and np.isfinite(shifted)
    assert shifted > 1e-3 and abs(same) < 1e-6 * shifted
    assert fid(a, a) == pytest.approx(same, abs=1e-9)  # the reference's statistics are reused, not accumulated
    assert "inception-v3-2015-12-05" in fid.name and fid.metric.inception.features_list == ["64"]


def test_fid_weights_missing_or_wrong(tmp_path, monkeypatch, inception_pth):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch hub cache
    with pytest.raises(UserError, match=r"weights-inception-2015-12-05-6726825d\.pth.*--fid-weights PATH"):
        metrics.InceptionFID(None)
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / inception_pth.name
    cached.write_bytes(inception_pth.read_bytes())
    assert metrics.find_fid_weights(None) == cached  # torch hub's cache, where torch-fidelity downloads it
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="are not the Inception-v3 FID weights"):
        metrics.InceptionFID(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="is not a PyTorch state dict"):
        metrics.InceptionFID(tmp_path / "junk.pth")


def test_clip_score_is_the_library_formula(tiny_clip):
    """torchmetrics' CLIPScore: max(mean over pairs of 100 cos(image embedding, text embedding), 0), by hand."""
    from transformers import CLIPModel, CLIPProcessor

    samples = [synth.make_sample(i, 32, 0) for i in range(3)]
    images, prompts = [s[0] for s in samples], [synth.caption(s[1]) for s in samples]
    got = metrics.LibraryClipScore(tiny_clip)(images, prompts, batch_size=2)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        cos = torch.cosine_similarity(img, txt.pooler_output)
    mean = (100 * cos).mean().item()
    assert mean > 0  # this seed's random CLIP: the clamp at 0 does not hide the comparison
    assert got == pytest.approx(max(mean, 0.0), rel=1e-4)


def test_fid_without_torch_fidelity_says_what_to_install(inception_pth, monkeypatch):
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch_fidelity" else real(name, *a)
    )
    for name in [n for n in sys.modules if n.startswith("torch_fidelity")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(UserError, match=r"pip install 'ldmkit\[metrics\]'"):
        metrics.InceptionFID(inception_pth)


def test_clip_model_not_found():
    with pytest.raises(UserError, match="not in the Hugging Face cache.*huggingface-cli download"):
        metrics.resolve_clip_model("nobody-here/no-such-clip")
    with pytest.raises(UserError, match="--clip-model /no/clip not found"):
        metrics.resolve_clip_model("/no/clip")


def test_evaluate_reports_fid_and_clip_next_to_the_teacher(tiny_sd15, inception_pth, tiny_clip, tmp_path, capsys):
    """COCO-style captions file and a reference image folder in; FID and CLIP score per step count for the model
    and the teacher's solver, each table saying which metric it shows."""
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"}],
        "annotations": [
            {"image_id": 3, "id": 1, "caption": "a small blue square"},
            {"image_id": 7, "id": 2, "caption": "a large red circle"},
            {"image_id": 7, "id": 4, "caption": "a second caption of image 7"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    (tmp_path / "ref").mkdir()
    for i, im in enumerate(_images(3, 2)):
        im.save(tmp_path / "ref" / f"{i}.png")
    argv = ["evaluate", "--model", str(tiny_sd15), "--prompts", str(tmp_path / "captions.json")]
    argv += ["--reference", str(tmp_path / "ref"), "--metrics", "fid,clip_score", "--fid-weights", str(inception_pth)]
    argv += ["--clip-model", str(tiny_clip), "--steps", "1", "--teacher-solvers", "ddim", "--no-caption-adherence"]
    assert main([*argv, "--height", "32", "--width", "32", "--out", str(tmp_path / "e")]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    for run in (m, m["teacher"]["ddim"]):
        assert run["num_images"] == 2 and run["feature_net"] is None  # fid only: the built-in FD was not asked
        assert run["fid_features"].startswith("inception-v3-2015-12-05") and run["clip_model"] == str(tiny_clip)
        (s,) = run["settings"]
        assert np.isfinite(s["fid"]) and s["fid"] > 0 and np.isfinite(s["clip_score"]) and s["fd"] is None
    out = capsys.readouterr().out
    assert "metrics: FID: inception-v3-2015-12-05" in out and "CLIP: 100 x cos" in out
    assert out.count("FID") >= 3 and "FD(ldmkit)" not in out  # the model's and the teacher's tables


def test_read_prompts_coco_captions(tmp_path):
    from ldmkit.eval.evaluate import read_prompts

    coco = {
        "images": [{"id": 2}, {"id": 1}],
        "annotations": [{"image_id": 1, "caption": " b "}, {"image_id": 2, "caption": "a"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert read_prompts(tmp_path / "c.json") == ["a", "b"]  # one caption per image, in the images' order
    (tmp_path / "l.json").write_text(json.dumps(["x", {"caption": "y"}, {"prompt": "z"}, ""]))
    assert read_prompts(tmp_path / "l.json") == ["x", "y", "z"]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        read_prompts(tmp_path / "bad.json")
