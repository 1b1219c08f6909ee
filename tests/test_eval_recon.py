"""tools/evaluate/eval_recon.py: networks read from the torchvision cache file (not fresh random models), SwAV and
CLIP from local files, unavailable networks, one-line errors with nothing written, labels, reruns, the control."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.spatial.distance
import torch
import torchvision
from PIL import Image
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from llava_brain.evaluation.controls import derangement
from llava_brain.evaluation.feature_nets import SWAV_FILE

from conftest import load_script
from stage_checks import error_line

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@pytest.fixture(scope="module")
def tool():
    return load_script("tools/evaluate/eval_recon.py")


def write_pairs(folder, n=6, seed=0, recon_size=32, stim_size=64, noise=12.0):
    """<folder>/recons and /stimuli: smooth random stimuli and noisy low-resolution copies as reconstructions,
    plus the reconstruction layout's index.json. Returns (recons, stimuli)."""
    rng = np.random.default_rng(seed)
    recons, stimuli = folder / "recons", folder / "stimuli"
    recons.mkdir(parents=True)
    stimuli.mkdir()
    for i in range(n):
        small = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8))
        stim = small.resize((stim_size, stim_size), Image.BILINEAR)
        rec = np.asarray(stim.resize((recon_size, recon_size), Image.BILINEAR), dtype=float)
        rec = np.clip(rec + rng.normal(0, noise, rec.shape), 0, 255).astype(np.uint8)
        stim.save(stimuli / f"subj01_te_{i:06d}.png")
        Image.fromarray(rec).save(recons / f"subj01_te_{i:06d}.png")
    (folder / "index.json").write_text(json.dumps({"subject": 1, "split": "te", "kind": "avg"}))
    return recons, stimuli


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "runs" / "recons" / "vit3d_vae" / "subj01_avg")


def read_png(path, size, norm):
    """A network input as Brain-Diffuser's eval_extract_features.py makes it: PIL resize, to_tensor, normalise."""
    return TF.normalize(TF.to_tensor(TF.resize(Image.open(path).convert("RGB"), [size, size])), *norm)


def hooked_features(model, modules, files, size, norm=IMAGENET):
    """{name: (N, D)} outputs of `modules` ({name: submodule}) during a full forward pass (forward hooks)."""
    out = {name: [] for name in modules}
    hooks = [m.register_forward_hook(lambda _m, _i, o, name=name: out[name].append(o.detach().clone().flatten(1)))
             for name, m in modules.items()]  # fmt: skip
    with torch.no_grad():
        model.eval()(torch.stack([read_png(f, size, norm) for f in files]))
    for h in hooks:
        h.remove()
    return {name: torch.cat(v).numpy().astype(np.float64) for name, v in out.items()}


def published_two_way(real, recon):
    n = len(real)
    r = np.corrcoef(real, recon)[:n, n:]
    return float(np.mean(np.sum(r < np.diag(r), axis=0)) / (n - 1))


def mean_distance(real, recon):
    return float(np.mean([scipy.spatial.distance.correlation(a, b) for a, b in zip(real, recon, strict=True)]))


def files(folder):
    return sorted(folder.glob("*.png"))


def run(tool, pairs, *extra):
    recons, stimuli = pairs
    return tool.main(["--recons", str(recons), "--stimuli", str(stimuli), "--quiet", *extra])


def test_torchvision_networks_are_read_from_their_cache_files(tool, pairs, tmp_path, monkeypatch):
    torch_home = tmp_path / "torch_home"
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(123)
    saved = {"alexnet": torchvision.models.alexnet(), "effnet": torchvision.models.efficientnet_b1()}
    torch.save(saved["alexnet"].state_dict(), cache / "alexnet-owt-7be5be79.pth")
    torch.save(saved["effnet"].state_dict(), cache / "efficientnet_b1_rwightman-bac287d4.pth")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    out = tmp_path / "eval" / "recon.json"
    assert run(tool, pairs, "--metrics", "alexnet2", "alexnet5", "effnet", "--json", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["networks"] == {"alexnet": str(cache / "alexnet-owt-7be5be79.pth"),
                                  "effnet": str(cache / "efficientnet_b1_rwightman-bac287d4.pth")}  # fmt: skip

    # the same numbers from models loaded from those files, read out with forward hooks
    recons, stimuli = pairs
    loaded = torchvision.models.alexnet()
    loaded.load_state_dict(torch.load(cache / "alexnet-owt-7be5be79.pth", weights_only=True))
    modules = {"alexnet2": loaded.features[4], "alexnet5": loaded.features[11]}
    real, rec = (hooked_features(loaded, modules, files(d), 224) for d in (stimuli, recons))
    perm = derangement(6, 0)
    for metric in ("alexnet2", "alexnet5"):
        assert result["metrics"][metric] == pytest.approx(published_two_way(real[metric], rec[metric]), abs=1e-9)
        assert result["shuffled"][metric] == pytest.approx(published_two_way(real[metric][perm], rec[metric]), abs=1e-9)
    eff = torchvision.models.efficientnet_b1()
    eff.load_state_dict(torch.load(cache / "efficientnet_b1_rwightman-bac287d4.pth", weights_only=True))
    real, rec = (hooked_features(eff, {"effnet": eff.avgpool}, files(d), 224)["effnet"] for d in (stimuli, recons))
    assert result["metrics"]["effnet"] == pytest.approx(mean_distance(real, rec), rel=1e-6)
    assert result["shuffled"]["effnet"] == pytest.approx(mean_distance(real[perm], rec), rel=1e-6)
    # a fresh random EfficientNet (what a silent fallback would use) gives other features
    fresh = torchvision.models.efficientnet_b1()
    other = hooked_features(fresh, {"effnet": fresh.avgpool}, files(stimuli), 224)["effnet"]
    assert not np.allclose(other, real, rtol=1e-2, atol=0)  # (random-init features are tiny: compare relatively)
    # provenance beside the JSON records the weight file it read
    manifest = json.loads((out.parent / "recon.json.run.json").read_text())
    assert manifest["inputs"]["alexnet"]["size"] == (cache / "alexnet-owt-7be5be79.pth").stat().st_size


def test_weights_dir_holds_the_same_file_names(tool, pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(torchvision.models.efficientnet_b1().state_dict(), weights / "efficientnet_b1_rwightman-bac287d4.pth")
    out = tmp_path / "r.json"
    assert run(tool, pairs, "--metrics", "effnet", "--weights-dir", str(weights), "--json", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["networks"] == {"effnet": str(weights / "efficientnet_b1_rwightman-bac287d4.pth")}
    assert isinstance(result["metrics"]["effnet"], float) and result["unavailable"] == {}


def test_a_foreign_weight_file_is_bad_input(tool, pairs, tmp_path, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save({"conv.weight": torch.zeros(2, 2)}, weights / "alexnet-owt-7be5be79.pth")
    out = tmp_path / "r.json"
    assert run(tool, pairs, "--metrics", "alexnet2", "--weights-dir", str(weights), "--json", str(out)) == 2
    assert str(weights / "alexnet-owt-7be5be79.pth") in error_line(capsys)
    assert not out.exists()


def test_swav_state_dict_with_module_prefixes_and_heads(tool, pairs, tmp_path):
    torch.manual_seed(7)
    resnet = torchvision.models.resnet50()
    state = {f"module.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    state["module.projection_head.0.weight"] = torch.zeros(8, 2048)  # SwAV's extra heads are dropped
    state["module.prototypes.weight"] = torch.zeros(3, 8)
    weights = tmp_path / SWAV_FILE
    torch.save(state, weights)
    out = tmp_path / "swav.json"
    assert run(tool, pairs, "--metrics", "swav", "--protocol", "mindeye", "--swav-weights", str(weights),
               "--json", str(out)) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["networks"] == {"swav": str(weights)}

    def tripped(folder):  # the mindeye protocol: 256² first, then SwAV's 224
        paths = []
        for f in files(folder):
            x = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            paths.append(TF.resize(x, [256, 256], interpolation=InterpolationMode.BILINEAR, antialias=True))
        return paths

    captured = []
    hook = resnet.avgpool.register_forward_hook(lambda _m, _i, o: captured.append(o.flatten(1).double().numpy()))
    recons, stimuli = pairs
    with torch.no_grad():
        for folder in (stimuli, recons):
            x = torch.stack([TF.resize(t, [224, 224], antialias=True) for t in tripped(folder)])
            resnet.eval()(TF.normalize(x, *IMAGENET))
    hook.remove()
    assert result["metrics"]["swav"] == pytest.approx(mean_distance(captured[0], captured[1]), rel=1e-6)


def test_clip_folder_uses_its_own_size_and_normalisation(tool, pairs, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from llava_brain.tiny import build_clip_vision

    model, processor = build_clip_vision()
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    out = tmp_path / "clip.json"
    assert run(tool, pairs, "--metrics", "clip", "pixcorr", "--clip-model", str(tmp_path / "clip"),
               "--json", str(out)) == 0  # fmt: skip
    result = json.loads(out.read_text())
    vision = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip").eval()
    recons, stimuli = pairs
    with torch.no_grad():
        real, rec = (vision(pixel_values=torch.stack([read_png(f, 32, CLIP_NORM) for f in files(d)]))
                     .image_embeds.double().numpy() for d in (stimuli, recons))  # fmt: skip
    assert result["metrics"]["clip"] == pytest.approx(published_two_way(real, rec), abs=1e-9)
    assert result["networks"] == {"clip": str(tmp_path / "clip")}


def test_missing_networks_are_unavailable_and_the_rest_is_computed(tool, pairs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    out = tmp_path / "recon.json"
    assert run(tool, pairs, "--metrics", "pixcorr", "ssim", "alexnet2", "swav", "clip",
               "--clip-model", str(tmp_path / "no_clip"), "--json", str(out)) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert isinstance(result["metrics"]["pixcorr"], float) and isinstance(result["metrics"]["ssim"], float)
    for metric in ("alexnet2", "swav", "clip"):
        assert result["metrics"][metric] == result["shuffled"][metric] == "unavailable"
    alexnet_file = tmp_path / "empty_torch_home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert str(alexnet_file) in result["unavailable"]["alexnet2"]
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in result["unavailable"]["alexnet2"]
    assert "swav_800ep_pretrain.pth.tar" in result["unavailable"]["swav"]
    assert "huggingface-cli download" in result["unavailable"]["clip"]
    assert result["networks"] == {}
    table = capsys.readouterr().out
    assert "| AlexNet(2) | unavailable | unavailable | ↑ |" in table
    assert "| SwAV | unavailable | unavailable | ↓ |" in table


def test_require_all_exits_2_naming_the_missing_file(tool, pairs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    out = tmp_path / "eval" / "recon.json"
    assert run(tool, pairs, "--metrics", "pixcorr", "effnet", "--require-all", "--json", str(out)) == 2
    line = error_line(capsys)
    assert str(tmp_path / "empty" / "hub" / "checkpoints" / "efficientnet_b1_rwightman-bac287d4.pth") in line
    assert "--require-all" in line
    assert not out.parent.exists() or not list(out.parent.iterdir())


@pytest.mark.parametrize("case", ["recon_without_stimulus", "stimulus_without_recon", "one_pair"])
def test_mismatched_folders_exit_2_with_nothing_written(tool, tmp_path, case, capsys):
    recons, stimuli = write_pairs(tmp_path / "run" / "subj01_avg", n=1 if case == "one_pair" else 3)
    if case == "recon_without_stimulus":
        (stimuli / "subj01_te_000001.png").unlink()
        missing = stimuli / "subj01_te_000001.png"
    elif case == "stimulus_without_recon":
        (recons / "subj01_te_000002.png").unlink()
        missing = recons / "subj01_te_000002.png"
    else:
        missing = recons
    out = tmp_path / "eval" / "recon.json"
    assert run(tool, (recons, stimuli), "--metrics", "pixcorr", "--json", str(out)) == 2
    assert str(missing) in error_line(capsys)
    assert not (tmp_path / "eval").exists()


def test_unreadable_png_exits_2_naming_it(tool, pairs, tmp_path, capsys):
    recons, _ = pairs
    (recons / "subj01_te_000003.png").write_bytes(b"not a png")
    assert run(tool, pairs, "--metrics", "pixcorr", "--json", str(tmp_path / "r.json")) == 2
    assert str(recons / "subj01_te_000003.png") in error_line(capsys)
    assert not (tmp_path / "r.json").exists()


def test_pixel_metrics_beat_the_shuffled_control_and_labels_come_from_the_layout(tool, pairs, tmp_path, capsys):
    out = tmp_path / "recon.json"
    assert run(tool, pairs, "--metrics", "pixcorr", "ssim", "--seed", "3", "--json", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["evaluation"] == "recon" and result["n"] == 6 and result["protocol"] == "braindiffuser"
    assert (result["run"], result["subject"], result["kind"]) == ("vit3d_vae", 1, "avg")
    assert result["metrics"]["pixcorr"] > 0.8 > 0.3 > result["shuffled"]["pixcorr"]
    assert result["metrics"]["ssim"] > result["shuffled"]["ssim"] + 0.1
    # Brain-Diffuser's evaluate_reconstruction.py: PIL's default resize to 425², np.corrcoef, rgb2gray + ssim;
    # the shuffled value pairs recon j with stimulus p[j], p = derangement(6, seed 3)
    recons, stimuli = pairs
    perm = derangement(6, 3)
    rec = [np.array(Image.open(f).resize((425, 425))) / 255.0 for f in files(recons)]
    stim = [np.array(Image.open(f).resize((425, 425))) / 255.0 for f in files(stimuli)]  # (64² here, not 425²)

    def ssim(a, b):
        return structural_similarity(rgb2gray(a), rgb2gray(b), gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1.0)  # fmt: skip

    def corr(a, b):
        return np.corrcoef(a.reshape(1, -1), b.reshape(1, -1))[0, 1]

    for metric, score in (("pixcorr", corr), ("ssim", ssim)):
        assert result["metrics"][metric] == pytest.approx(np.mean([score(rec[j], stim[j]) for j in range(6)]), abs=1e-6)
        shuffled = np.mean([score(rec[j], stim[perm[j]]) for j in range(6)])
        assert result["shuffled"][metric] == pytest.approx(shuffled, abs=1e-6)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "| metric | value | shuffled | ↑/↓ |" and lines[3].startswith("| PixCorr | ")


def test_labels_from_flags_and_folder_name(tool, tmp_path):
    recons, stimuli = write_pairs(tmp_path / "plain" / "myrun", n=2)
    (recons.parent / "index.json").unlink()
    out = tmp_path / "a.json"
    assert tool.main(["--recons", str(recons), "--stimuli", str(stimuli), "--metrics", "pixcorr", "--quiet",
                      "--json", str(out)]) == 0  # fmt: skip
    assert (json.loads(out.read_text())["run"], json.loads(out.read_text())["subject"]) == ("myrun", None)
    out = tmp_path / "b.json"
    assert tool.main(["--recons", str(recons), "--stimuli", str(stimuli), "--metrics", "pixcorr", "--quiet",
                      "--run", "ridge", "--subject", "5", "--kind", "single", "--json", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert (result["run"], result["subject"], result["kind"]) == ("ridge", 5, "single")


def test_rerun_is_skipped_other_settings_are_refused(tool, pairs, tmp_path, capsys):
    out = tmp_path / "recon.json"
    assert run(tool, pairs, "--metrics", "pixcorr", "--json", str(out)) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert run(tool, pairs, "--metrics", "pixcorr", "--json", str(out)) == 0
    assert "is current" in capsys.readouterr().out and out.read_bytes() == before
    assert run(tool, pairs, "--metrics", "pixcorr", "--protocol", "mindeye", "--json", str(out)) == 2
    assert "--overwrite" in error_line(capsys) and out.read_bytes() == before
    assert run(tool, pairs, "--metrics", "pixcorr", "--protocol", "mindeye", "--json", str(out), "--overwrite") == 0
    assert json.loads(out.read_text())["protocol"] == "mindeye"


def test_several_folders_in_one_call_score_like_separate_calls(tool, tmp_path, capsys):
    first = write_pairs(tmp_path / "a" / "subj01_avg", seed=1)
    second = write_pairs(tmp_path / "b" / "subj02_avg", seed=2)
    metrics = ["--metrics", "pixcorr", "ssim"]
    for k, pair in enumerate((first, second)):
        assert run(tool, pair, *metrics, "--json", str(tmp_path / f"one{k}.json")) == 0
    both = [str(tmp_path / "both0.json"), str(tmp_path / "both1.json")]
    argv = ["--recons", str(first[0]), str(second[0]), "--stimuli", str(first[1]), str(second[1]), "--quiet",
            *metrics, "--json", *both]  # fmt: skip
    assert tool.main(argv) == 0
    for k in range(2):
        one, together = (json.loads((tmp_path / f"{name}{k}.json").read_text()) for name in ("one", "both"))
        assert together["metrics"] == one["metrics"] and together["shuffled"] == one["shuffled"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        tool.main([*argv[:-1], "--overwrite"])  # two folders, one --json file
    assert exit_info.value.code == 2
    assert "one --stimuli folder (and one --json file) per --recons folder" in capsys.readouterr().err
