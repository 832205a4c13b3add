"""dcdb.train and dcdb.eval end to end on a toy world of coloured shapes, plus metric brute force.

The toy shards (resharder layout) and tasks (clip_benchmark layout) are drawn from a seeded RNG in
a temporary folder; the tiny open_clip model trains for 10 steps per run on the CPU.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as `dcdb` does before it loads torch

from dcdb.errors import EvalError, OutputError, ResumeError, TaskError, TrainError, UsageError

# 10 steps of batch 32, cut into DataComp's 5 checkpoints
SHORT = {"samples_seen": 320, "batch_size": 32, "workers": 0, "progress": False}


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Toy training shards and evaluation tasks."""
    from dcdb.demo.toy import write_toy_shards, write_toy_tasks

    root = tmp_path_factory.mktemp("toy")
    data = write_toy_shards(root / "data", 160, seed=0, shard_size=64)
    tasks = write_toy_tasks(root / "tasks", 48, seed=1)
    return data, tasks


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    """A finished tiny run that kept every checkpoint."""
    from dcdb.train import train

    data, _ = world
    out = tmp_path_factory.mktemp("runs") / "toy"
    result = train(data, out, "tiny", seed=0, save_every=1, **SHORT)
    return out, result


def _weights(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _same_weights(a, b) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------- recipes


DATACOMP_SCALE_CONFIGS = {  # DataComp's scale_configs.py, verbatim numbers
    "debug": (1024, 1e-4, 128_000, 500, "ViT-B-32", None),
    "small": (4096, 5e-4, 12_800_000, 500, "ViT-B-32", None),
    "medium": (4096, 5e-4, 128_000_000, 500, "ViT-B-32", None),
    "large": (8192, 5e-4, 1_280_000_000, 500, "ViT-B-16", None),
    "xlarge": (90112, 1e-3, 12_800_000_000, 10000, "ViT-L-14", 0.95),
}


@pytest.mark.parametrize("scale", sorted(DATACOMP_SCALE_CONFIGS))
def test_recipes_equal_datacomp(scale):
    from dcdb.train import get_recipe

    batch, lr, samples, warmup, model, beta2 = DATACOMP_SCALE_CONFIGS[scale]
    r = get_recipe(scale)
    assert (r.batch_size, r.learning_rate, r.samples_seen, r.warmup, r.model) == (batch, lr, samples, warmup, model)
    # open_clip_train's ViT defaults unless DataComp passes --beta2; its --wd default 0.2
    assert (r.beta1, r.beta2, r.eps, r.weight_decay) == (0.9, beta2 or 0.98, 1e-6, 0.2)
    assert (r.num_checkpoints, r.schedule, r.dataset_resampled, r.precision) == (5, "cosine", True, "amp")
    assert r.samples_per_checkpoint == samples // 5
    assert r.image_size == 224


def test_recipe_image_sizes_match_open_clip():
    from dcdb.train import RECIPES
    from dcdb.train.models import model_config

    for recipe in RECIPES.values():
        assert model_config(recipe.model)["vision_cfg"]["image_size"] == recipe.image_size


def test_unknown_scale_lists_scales():
    from dcdb.train import get_recipe

    with pytest.raises(UsageError, match="unknown scale 'huge'") as exc:
        get_recipe("huge")
    assert "tiny, debug, small, medium, large, xlarge" in str(exc.value)


def test_overrides_and_step_arithmetic():
    from dcdb.train import get_recipe

    r = get_recipe("tiny", batch_size=32, samples_seen=330)
    assert (r.samples_per_checkpoint, r.steps_per_checkpoint, r.total_steps) == (66, 3, 15)  # open_clip rounds up
    with pytest.raises(UsageError):
        get_recipe("tiny", samples_seen=3)


def test_tiny_model_registered_with_open_clip():
    import open_clip

    from dcdb.train import register_models
    from dcdb.train.models import quiet_random_init

    assert "dcdb-tiny" in register_models()
    assert "dcdb-tiny" in open_clip.list_models()
    with quiet_random_init():
        model = open_clip.create_model("dcdb-tiny")
    n = sum(p.numel() for p in model.parameters())
    assert 5e6 < n < 10e6
    assert open_clip.get_tokenizer("dcdb-tiny")(["a red circle"]).shape == (1, 32)


# ------------------------------------------------------------------------------ bad input


def test_empty_training_data(tmp_path):
    from dcdb.train import find_shards, train

    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match="no .tar shards"):
        train(tmp_path / "empty", tmp_path / "out", "tiny", progress=False)
    assert not (tmp_path / "out").exists()  # nothing written before the input is checked

    shards = tmp_path / "no_samples"
    shards.mkdir()
    with tarfile.open(shards / "00000000.tar", "w") as tar:  # a json but no image/caption pair
        member = tmp_path / "x.json"
        member.write_text("{}")
        tar.add(member, arcname="abc-0.json")
    with pytest.raises(TrainError, match="hold no sample with both an image"):
        find_shards(shards)
    with pytest.raises(TrainError, match="does not exist"):
        find_shards(tmp_path / "nope")


def test_meta_json_names_missing_shard(world, tmp_path):
    from dcdb.train import find_shards

    data, _ = world
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    (copy / "00000001.tar").unlink()
    with pytest.raises(TrainError, match="00000001.tar"):
        find_shards(copy)


def test_find_shards_reads_meta_and_plain_folders(world, tmp_path):
    from dcdb.train import find_shards

    data, _ = world
    s = find_shards(data)
    assert (s.source, len(s.shards), s.num_samples) == ("meta.json", 3, 160)
    plain = tmp_path / "plain"
    plain.mkdir()
    for tar in sorted(data.glob("*.tar")):
        shutil.copy(tar, plain / tar.name)  # no meta.json, no _stats.json: counted from the tars
    p = find_shards(plain)
    assert (p.source, p.num_samples, p.fingerprint) == ("folder", 160, s.fingerprint)


# ------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_dataloader_workers_after_lance_raise_no_warning(world, tmp_path):
    """The demo ingests (Lance) and then trains with worker processes in one process; Lance warns
    at every fork. The workers never call Lance, so the training loader silences that warning
    (the suite turns warnings into errors) and trains."""
    import lance  # noqa: F401  (registers Lance's at-fork warning)

    from dcdb.train import train

    data, _ = world
    res = train(data, tmp_path / "w1", "tiny", seed=0, samples_seen=64, batch_size=32, workers=1, progress=False)
    assert res.samples_seen >= 64 and res.checkpoint.is_file()


@pytest.mark.slow  # the module's training run (10 steps, 5 checkpoints), as every test that uses it
def test_train_writes_checkpoints_and_run_info(run, world):
    out, result = run
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"epoch_{k}.pt" for k in range(1, 6)] + ["epoch_latest.pt"]
    assert _same_weights(_weights(ckpts / "epoch_5.pt"), _weights(ckpts / "epoch_latest.pt"))
    assert not _same_weights(_weights(ckpts / "epoch_1.pt"), _weights(ckpts / "epoch_5.pt"))
    assert (result.steps, result.samples_seen, result.epochs) == (10, 320, 5)
    assert result.losses[-1] < result.losses[0]

    info = json.loads((out / "info.json").read_text())
    assert (info["scale"], info["model"], info["seed"], info["status"]) == ("tiny", "dcdb-tiny", 0, "complete")
    assert info["recipe"]["batch_size"] == 32 and info["overrides"] == {"batch_size": 32, "samples_seen": 320}
    assert info["data"]["samples"] == 160 and info["data"]["source"] == "meta.json"
    assert info["samples_seen"] == 320 and info["checkpoint"] == "checkpoints/epoch_latest.pt"
    datacomp = pickle.loads((out / "info.pkl").read_bytes())  # what DataComp's evaluate.py reads
    assert datacomp["scale_config"]["model"] == "dcdb-tiny" and Path(datacomp["checkpoint"]).is_file()

    import torch

    ckpt = torch.load(ckpts / "epoch_latest.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 5 and {"state_dict", "optimizer", "dcdb"} <= set(ckpt)
    assert not list(out.rglob("*.dcdb-tmp-*"))


@pytest.mark.slow
def test_resume_continues_and_refuses_changes(run, world, tmp_path):
    from dcdb.train import train

    data, _ = world
    out, _ = run
    before = (out / "checkpoints" / "epoch_latest.pt").stat().st_mtime_ns

    with pytest.raises(OutputError, match="already holds a training run"):
        train(data, out, "tiny", seed=0, **SHORT)
    done = train(data, out, "tiny", seed=0, resume="latest", **SHORT)  # already complete: nothing to do
    assert done.losses == [] and done.resumed_from_epoch == 5 and done.summary().startswith("already trained")
    assert (out / "checkpoints" / "epoch_latest.pt").stat().st_mtime_ns == before

    with pytest.raises(ResumeError, match=r"recipe changed \(batch_size 32 -> 16"):
        train(data, out, "tiny", seed=0, resume="latest", **{**SHORT, "batch_size": 16})
    with pytest.raises(ResumeError, match=r"seed changed \(0 -> 1\)"):
        train(data, out, "tiny", seed=1, resume="latest", **SHORT)
    other = tmp_path / "other_data"
    shutil.copytree(data, other)
    (other / "00000002.tar").unlink()
    (other / "00000002_stats.json").unlink()
    (other / "meta.json").unlink()
    with pytest.raises(ResumeError, match="training data changed"):
        train(other, out, "tiny", seed=0, resume="latest", **SHORT)

    # continue from checkpoint 2 in a new folder: 3 more checkpoints
    resumed = train(data, tmp_path / "resumed", "tiny", seed=0, resume=out / "checkpoints" / "epoch_2.pt", **SHORT)
    assert resumed.resumed_from_epoch == 2 and len(resumed.losses) == 3
    info = json.loads((tmp_path / "resumed" / "info.json").read_text())
    assert (info["epochs_completed"], info["steps"], info["status"]) == (5, 10, "complete")


# ------------------------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_cli_train_is_seeded_like_the_library(run, world, tmp_path):
    from click.testing import CliRunner

    import dcdb.cli.train  # noqa: F401  (registers the commands)
    from dcdb.cli import cli

    data, _ = world
    out, _ = run
    res = CliRunner().invoke(cli, ["-q", "train", "--scale", "tiny", "--data", str(data), "--output",
                                   str(tmp_path / "cli"), "--samples-seen", "320", "--batch-size", "32",
                                   "--workers", "0", "--save-every", "1"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().endswith("epoch_latest.pt")
    # same seed, same data, same recipe -> the same weights at every checkpoint
    assert _same_weights(_weights(tmp_path / "cli/checkpoints/epoch_2.pt"), _weights(out / "checkpoints/epoch_2.pt"))
    assert _same_weights(_weights(tmp_path / "cli/checkpoints/epoch_latest.pt"),
                         _weights(out / "checkpoints/epoch_latest.pt"))


def test_cli_train_bad_input(world, tmp_path):
    from click.testing import CliRunner

    import dcdb.cli.train  # noqa: F401
    from dcdb.cli import cli

    data, _ = world
    res = CliRunner().invoke(cli, ["train", "--scale", "huge", "--data", str(data), "--output", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown scale 'huge'" in res.stderr and "xlarge" in res.stderr
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "x")])
    assert res.exit_code == 1 and "no training data" in res.stderr


def test_cli_module_does_not_import_torch():
    code = ("import sys, dcdb.cli, dcdb.cli.train; "
            "bad = [m for m in ('torch', 'open_clip', 'webdataset') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_does_not_import_eval():
    """eval uses train's models and checkpoints, never the other way round (lazy imports count too)."""
    import ast

    root = Path(__file__).resolve().parent.parent / "train"
    bad = []
    for f in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:  # train/x.py: "." is dcdb.train, ".." is dcdb
                    mod = ".".join(filter(None, ["dcdb.train" if node.level == 1 else "dcdb", mod]))
                names = [mod, *(f"{mod}.{a.name}" for a in node.names)]
            else:
                continue
            bad += [f"{f.name}:{node.lineno} {n}" for n in names if n == "dcdb.eval" or n.startswith("dcdb.eval.")]
    assert not bad, bad


# ----------------------------------------------------------------------------------- eval


@pytest.mark.slow
def test_eval_results_format_skip_and_average(run, world, tmp_path):
    from dcdb.eval import evaluate

    out, _ = run
    _, tasks = world
    result = evaluate(out, tasks)
    path = out / "eval_results.jsonl"
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert [l["key"] for l in lines] == ["shapes", "forms", "toy_retrieval"]
    assert [l["dataset"] for l in lines] == ["Toy shapes", "Toy forms", "Toy retrieval"]
    shapes, forms, retrieval = (l["metrics"] for l in lines)
    assert {"acc1", "acc5", "mean_per_class_recall", "main_metric"} <= set(shapes)
    assert shapes["main_metric"] == shapes["acc1"]
    assert forms["acc5"] is None  # 4 classes: DataComp leaves acc5 out below 5 classes
    assert forms["main_metric"] == forms["mean_per_class_recall"]
    assert retrieval["main_metric"] == pytest.approx(
        (retrieval["image_retrieval_recall@1"] + retrieval["text_retrieval_recall@1"]) / 2)
    assert all(0.0 <= retrieval[f"{d}_retrieval_recall@{k}"] <= 1.0 for d in ("image", "text") for k in (1, 5, 10))
    assert result.average == pytest.approx(np.mean([m["main_metric"] for m in (shapes, forms, retrieval)]))
    assert result.evaluated == ["shapes", "forms", "toy_retrieval"]

    text = path.read_text()
    again = evaluate(out, tasks)
    assert again.evaluated == [] and again.skipped == ["shapes", "forms", "toy_retrieval"]
    assert path.read_text() == text and again.average == result.average

    lines = text.splitlines()  # a killed run's torn last line: dropped, that task evaluated again
    path.write_text("\n".join(lines[:2]) + '\n{"key": "toy_retr')
    third = evaluate(out, tasks)
    assert third.evaluated == ["toy_retrieval"]
    assert [json.loads(l)["key"] for l in path.read_text().splitlines()] == ["shapes", "forms", "toy_retrieval"]


@pytest.mark.slow
def test_eval_metric_it_cannot_compute_is_null_and_not_averaged(run, world, tmp_path):
    from dcdb.eval import evaluate

    out, _ = run
    _, tasks = world
    copy = tmp_path / "tasks"
    shutil.copytree(tasks, copy)
    listed = json.loads((copy / "tasklist.json").read_text())
    listed["forms"]["main_metric"] = "F1-macro_all"  # a DataComp WILDS metric dcdb does not compute
    (copy / "tasklist.json").write_text(json.dumps(listed))
    result = evaluate(out / "checkpoints" / "epoch_latest.pt", copy, output=tmp_path / "ev", tasks=["shapes", "forms"])
    by_key = {r["key"]: r["metrics"] for r in result.results}
    assert by_key["forms"]["main_metric"] is None
    assert result.average == pytest.approx(by_key["shapes"]["acc1"])


@pytest.mark.slow
def test_eval_refuses_results_of_another_checkpoint(run, world, tmp_path):
    from dcdb.eval import evaluate

    out, _ = run
    _, tasks = world
    first = evaluate(out / "checkpoints" / "epoch_1.pt", tasks, output=tmp_path, tasks=["forms"])
    assert first.evaluated == ["forms"]
    with pytest.raises(EvalError, match="results of another checkpoint"):
        evaluate(out / "checkpoints" / "epoch_5.pt", tasks, output=tmp_path, tasks=["forms"])
    again = evaluate(out / "checkpoints" / "epoch_5.pt", tasks, output=tmp_path, tasks=["forms"], overwrite=True)
    assert again.evaluated == ["forms"]

    copy = tmp_path / "copy"  # a run folder copied or moved elsewhere: the same weights, resumed
    shutil.copytree(out, copy)
    for name in ("eval_results.jsonl", "eval_info.json"):  # another test may have evaluated `out` itself
        (copy / name).unlink(missing_ok=True)
    assert evaluate(copy, tasks, tasks=["forms"]).evaluated == ["forms"]
    moved = tmp_path / "moved"
    copy.rename(moved)
    assert evaluate(moved, tasks, tasks=["forms"]).skipped == ["forms"]


@pytest.mark.slow
def test_eval_wrong_architecture(run, world, tmp_path):
    import open_clip
    import torch

    from dcdb.eval import evaluate

    out, _ = run
    _, tasks = world
    with pytest.raises(EvalError, match="trained as 'dcdb-tiny', not 'ViT-B-32'"):
        evaluate(out, tasks, model="ViT-B-32", output=tmp_path / "a")

    # a plain open_clip checkpoint (no dcdb record) loaded as another architecture
    wide = {"embed_dim": 64,
            "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp_path / "test-other-arch.json").write_text(json.dumps(wide))
    open_clip.add_model_config(tmp_path / "test-other-arch.json")
    plain = tmp_path / "plain.pt"
    torch.save({"epoch": 5, "state_dict": _weights(out / "checkpoints" / "epoch_latest.pt")}, plain)
    with pytest.raises(EvalError, match="does not fit architecture 'test-other-arch'"):
        evaluate(plain, tasks, model="test-other-arch", output=tmp_path / "b")
    with pytest.raises(EvalError, match="cannot tell the architecture"):
        evaluate(plain, tasks, output=tmp_path / "c")
    ok = evaluate(plain, tasks, model="dcdb-tiny", output=tmp_path / "d", tasks=["Toy forms"])
    assert ok.evaluated == ["forms"]


@pytest.mark.slow
def test_cli_eval_and_leaderboard(run, world, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    import dcdb.cli.train  # noqa: F401
    from dcdb.cli import cli

    out, _ = run
    _, tasks = world
    runs = tmp_path / "runs"
    runs.mkdir()
    for name in ("a", "b"):  # two run folders sharing the trained checkpoint
        (runs / name / "checkpoints").mkdir(parents=True)
        shutil.copy(out / "info.json", runs / name / "info.json")
        os.link(out / "checkpoints" / "epoch_latest.pt", runs / name / "checkpoints" / "epoch_latest.pt")
    res = CliRunner().invoke(cli, ["-q", "eval", str(runs / "a"), "--tasks", str(tasks)])
    assert res.exit_code == 0, res.output
    assert "| Toy shapes | acc1 |" in res.stdout and "**average**" in res.stdout
    res = CliRunner().invoke(cli, ["eval", str(runs / "b"), "--tasks", str(tasks), "--task", "forms", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["key"] == "forms"

    res = CliRunner().invoke(cli, ["-q", "leaderboard", str(runs), "--plot", str(tmp_path / "lb.png")])
    assert res.exit_code == 0, res.output
    table = res.stdout.splitlines()
    assert table[0] == "| run | scale | seed | samples | Toy shapes | Toy forms | Toy retrieval | average |"
    assert len([l for l in table if l.startswith(("| a |", "| b |"))]) == 2
    assert "Not evaluated on every task" in res.stdout  # b has only one task
    with Image.open(tmp_path / "lb.png") as img:
        assert img.format == "PNG" and img.width > 300

    res = CliRunner().invoke(cli, ["leaderboard", str(tmp_path / "runs" / "a" / "checkpoints")])
    assert res.exit_code == 1 and "no evaluated run" in res.stderr


# ----------------------------------------------------------------------------------- tasks


def test_task_folder_missing_file_is_named(world, tmp_path):
    from dcdb.eval import load_tasks

    _, tasks = world
    copy = tmp_path / "tasks"
    shutil.copytree(tasks, copy)
    (copy / "shapes" / "classnames.txt").unlink()
    with pytest.raises(TaskError, match=r"task file missing: .*shapes/classnames.txt"):
        load_tasks(copy)
    shutil.copytree(tasks / "shapes", copy / "shapes", dirs_exist_ok=True)
    (copy / "shapes" / "test" / "1.tar").unlink()
    with pytest.raises(TaskError, match=r"shapes/test/1.tar.*says 2 shards"):
        load_tasks(copy)
    with pytest.raises(TaskError, match="unknown task"):
        load_tasks(tasks, ["nope"])
    with pytest.raises(TaskError, match="does not exist"):
        load_tasks(tmp_path / "nowhere")


def test_tasklist_yaml_and_datacomp_folder_names(world, tmp_path):
    from dcdb.eval import load_tasks

    _, tasks = world
    copy = tmp_path / "tasks"
    copy.mkdir()
    shutil.copytree(tasks / "forms", copy / "wds_vtab-forms_test")  # DataComp's download name
    shutil.copytree(tasks / "toy_retrieval", copy / "toy_retrieval")
    (copy / "tasklist.yml").write_text(
        "vtab/forms:\n  name: Forms\n  main_metric: mean_per_class_recall\n  size: 48\n"
        "toy_retrieval:\n  name: Retrieval\n  main_metric: mean_recall@1\n  type: zeroshot_retrieval\n")
    found = load_tasks(copy)
    assert [(t.key, t.name, t.type, t.main_metric) for t in found] == [
        ("vtab/forms", "Forms", "classification", "mean_per_class_recall"),
        ("toy_retrieval", "Retrieval", "retrieval", "mean_recall@1"),
    ]
    (copy / "tasklist.yml").write_text("missing_task: {name: X}\n")
    with pytest.raises(TaskError, match="task 'missing_task' has no folder"):
        load_tasks(copy)


def test_tasks_without_tasklist_are_discovered(world, tmp_path):
    from dcdb.eval import load_tasks

    _, tasks = world
    copy = tmp_path / "tasks"
    shutil.copytree(tasks, copy)
    (copy / "tasklist.json").unlink()
    found = {t.key: (t.type, t.main_metric) for t in load_tasks(copy)}
    assert found == {"forms": ("classification", "acc1"), "shapes": ("classification", "acc1"),
                     "toy_retrieval": ("retrieval", "mean_recall@1")}


# --------------------------------------------------------------------- metrics: brute force


def _brute_classification(logits, targets):
    order = [sorted(range(logits.shape[1]), key=lambda j: -logits[i, j]) for i in range(len(targets))]
    acc1 = np.mean([o[0] == t for o, t in zip(order, targets)])
    acc5 = np.mean([t in o[:5] for o, t in zip(order, targets)])
    recalls = []
    for c in sorted(set(targets.tolist())):
        idx = [i for i, t in enumerate(targets) if t == c]
        recalls.append(np.mean([order[i][0] == c for i in idx]))
    return acc1, acc5, np.mean(recalls)


def test_classification_metrics_match_brute_force():
    from dcdb.eval import classification_metrics

    rng = np.random.default_rng(0)
    images = rng.normal(size=(200, 16))
    classes = rng.normal(size=(12, 16))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    logits = 100 * images @ classes.T
    targets = np.where(rng.random(200) < 0.5, logits.argmax(1), rng.integers(0, 10, 200))  # classes 10, 11 rare
    m = classification_metrics(logits, targets)
    acc1, acc5, mpcr = _brute_classification(logits, targets)
    assert m["acc1"] == pytest.approx(acc1) and m["acc5"] == pytest.approx(acc5)
    assert m["mean_per_class_recall"] == pytest.approx(mpcr)
    assert classification_metrics(logits[:, :4], targets % 4)["acc5"] is None


def _brute_retrieval(scores, text_image, k):
    n_texts, n_images = scores.shape
    t2i = np.mean([text_image[t] in np.argsort(-scores[t])[:k] for t in range(n_texts)])
    hits = []
    for i in range(n_images):
        top = np.argsort(-scores[:, i])[:k]
        hits.append(any(text_image[t] == i for t in top))
    return t2i, np.mean(hits)


def test_retrieval_metrics_match_brute_force():
    from dcdb.eval import retrieval_metrics

    rng = np.random.default_rng(1)
    n_images = 40
    text_image = np.repeat(np.arange(n_images), rng.integers(1, 4, n_images))  # 1-3 captions per image
    img = rng.normal(size=(n_images, 8))
    txt = img[text_image] + rng.normal(scale=1.5, size=(len(text_image), 8))
    scores = txt @ img.T
    m = retrieval_metrics(scores, text_image, ks=(1, 5, 10))
    for k in (1, 5, 10):
        t2i, i2t = _brute_retrieval(scores, text_image, k)
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
    assert m["mean_recall@1"] == pytest.approx((m["image_retrieval_recall@1"] + m["text_retrieval_recall@1"]) / 2)
    assert retrieval_metrics(scores[:, :3], text_image % 3, ks=(10,))["text_retrieval_recall@10"] == 1.0


def test_zero_shot_classifier_averages_normalised_template_embeddings():
    import open_clip
    import torch

    from dcdb.eval.zeroshot import zero_shot_classifier
    from dcdb.train import register_models
    from dcdb.train.models import quiet_random_init

    register_models()
    torch.manual_seed(0)
    with quiet_random_init():
        model = open_clip.create_model("dcdb-tiny").eval()
    tok = open_clip.get_tokenizer("dcdb-tiny")
    names, templates = ["red circle", "blue square", "cross"], ["a photo of a {c}.", "{c}", "a drawing of a {c}."]
    got = zero_shot_classifier(model, tok, names, templates, "cpu").numpy()
    with torch.no_grad():
        for j, name in enumerate(names):
            emb = model.encode_text(tok([t.format(c=name) for t in templates])).numpy()
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            mean = emb.mean(axis=0)
            np.testing.assert_allclose(got[:, j], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
