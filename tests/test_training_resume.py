"""Resumable training of the embedded model: a run split over training-state files ends as one uninterrupted run,
bad state files raise naming the file, the state is written atomically, and the scripts split their smoke runs."""

import json
import pathlib
import runpy
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sagesla.embedded import finetuned
from sagesla.embedded.checkpoint import TrainingCheckpoint, load_state, save_state
from sagesla.embedded.model import TINY_VIDEO_CONFIG, PromptEmbedding
from sagesla.embedded.training import Batches, fit

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
TWO_BLOCKS = {**TINY_VIDEO_CONFIG, "num_layers": 2}


def run_script(name: str, *argv: str) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [name, *argv])
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")


def wan_run(seed: int, batch_seed: int) -> tuple[torch.nn.Module, PromptEmbedding, Batches, list[dict]]:
    """A 2-block model and its prompt embedding as ``train_tiny.py --smoke`` trains them, with batches of one video
    (the smoke runs' two double the time, and the scripts' tests below split those)."""
    from sagesla.embedded.model import build

    torch.manual_seed(seed)
    model, prompts = build(TWO_BLOCKS)
    model.train(), prompts.train()
    batches = Batches(1, batch_seed, "cpu", text_dropout=0.1, sigma_shift=3.0)
    return model, prompts, batches, [{"params": [*model.parameters(), *prompts.parameters()], "lr": 3e-4}]


def flow_loss(model, prompts, batches):
    from sagesla.embedded.training import flow_matching_loss

    return lambda: flow_matching_loss(model, batches.draw(prompts))


def test_a_run_split_over_a_state_file_ends_bit_for_bit_as_one_run(tmp_path):
    """6 steps in one call against 3, stopped by ``stop_after``, and 3 more resumed into a model and batch source
    built from other seeds (so only the file can make them equal). On the CPU the same operations on the same
    values give the same bits, so anything the file fails to carry (a moment, the schedule's step, an RNG draw, a
    rounding of the weights) shows up as a difference: the comparison is exact."""
    pytest.importorskip("diffusers")
    model, prompts, batches, groups = wan_run(0, 0)
    whole = fit(flow_loss(model, prompts, batches), groups, 6, "cpu")

    path = tmp_path / "state.safetensors"

    def checkpointed(seed: int, batch_seed: int, resume=None, **settings):
        """(the run, its transformer, its prompt embedding): a run of ``wan_run(seed, batch_seed)`` over ``path``."""
        model, prompts, batches, groups = wan_run(seed, batch_seed)
        checkpoint = TrainingCheckpoint(path, {"transformer": model, "prompts": prompts}, batches, **settings)
        return fit(flow_loss(model, prompts, batches), groups, 6, "cpu", checkpoint, resume), model, prompts

    stopped, _, _ = checkpointed(0, 0, stop_after=3)
    assert not stopped.finished and stopped.losses == whole.losses[:3]
    assert str(stopped).startswith("steps 1-3 of 6 in ")

    resumed, again_model, again_prompts = checkpointed(5, 7, load_state(path))
    assert resumed.finished and resumed.start == 3 and str(resumed).startswith("steps 4-6 of 6 in ")
    assert resumed.losses == whole.losses
    for ours, theirs in ((again_model, model), (again_prompts, prompts)):
        for (key, value), other in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(value, other), key
    state = load_state(path)
    assert state.step == state.steps == 6 and state.losses == whole.losses


class Toy(torch.nn.Module):
    """Two linear layers: a run that checks and saves in milliseconds."""

    def __init__(self, hidden: int = 3):
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, hidden), torch.nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def toy_run(path, hidden=3, batch=2, lr=0.1, trained="all", stop_after=None, every=2, run=None, seed=0):
    """(loss, groups, checkpoint, model, calls): the toy's loss counts its calls in ``calls``."""
    torch.manual_seed(seed)
    model, calls = Toy(hidden), []
    batches = Batches(batch, 0, "cpu")
    data = torch.randn(8, 4)

    def loss() -> torch.Tensor:
        calls.append(1)
        return model(data).square().mean()

    params = list(model.parameters()) if trained == "all" else list(model.first.parameters())
    checkpoint = TrainingCheckpoint(path, {"toy": model}, batches, every, stop_after, run or {"objective": "flow"})
    return loss, [{"params": params, "lr": lr}], checkpoint, model, calls


@pytest.fixture
def toy_state(tmp_path) -> pathlib.Path:
    """A toy run of 6 steps stopped after 3, its state file."""
    path = tmp_path / "state.safetensors"
    loss, groups, checkpoint, _, _ = toy_run(path, stop_after=3)
    fit(loss, groups, 6, "cpu", checkpoint)
    return path


def test_fit_writes_the_state_every_n_steps_and_when_it_stops(tmp_path, monkeypatch):
    from sagesla.embedded import training

    written = []
    monkeypatch.setattr(training, "save_state", lambda path, state: written.append(state.step))
    loss, groups, checkpoint, _, _ = toy_run(tmp_path / "state.safetensors", every=2)
    fit(loss, groups, 7, "cpu", checkpoint)
    assert written == [2, 4, 6, 7]
    written.clear()
    loss, groups, checkpoint, _, calls = toy_run(tmp_path / "state.safetensors", every=4, stop_after=5)
    run = fit(loss, groups, 7, "cpu", checkpoint)
    assert written == [4, 5] and len(calls) == 5 and not run.finished


@pytest.mark.parametrize(
    "change, steps, found",
    [
        ({}, 8, r"its run has 6 steps, this one 8"),
        ({"hidden": 5}, 6, r"tensor\(s\) differ: toy.first.weight is torch.float32 \(3, 4\) there, .* \(5, 4\) here"),
        ({"trained": "first"}, 6, r"trains other parameters: 2 only there \(toy.second.weight, toy.second.bias\)"),
        ({"lr": 0.2}, 6, r"its groups peak at lr \[0.1\], this run's at \[0.2\]"),
        ({"batch": 3}, 6, r"`state` was drawn with other settings: batch 2 \(here 3\)"),
        ({"run": {"objective": "distill"}}, 6, r"objective 'flow' \(this run 'distill'\)"),
    ],
    ids=["steps", "shapes", "trainable", "lr", "batches", "run"],
)
def test_a_state_that_does_not_fit_the_run_raises_naming_the_file_before_any_step(toy_state, change, steps, found):
    loss, groups, checkpoint, model, calls = toy_run(toy_state, seed=1, **change)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"training state '{toy_state}' does not fit this run: .*{found}"):
        fit(loss, groups, steps, "cpu", checkpoint, load_state(toy_state))
    assert not calls
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def rewritten(path: pathlib.Path, drop: str | None = None, metadata_drop: str | None = None, **replace) -> None:
    """Save ``path`` again without the tensor ``drop`` / metadata entry ``metadata_drop``, with tensors replaced."""
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = {key: value for key, value in load_file(path).items() if key != drop} | replace
    save_file(tensors, path, {key: value for key, value in metadata.items() if key != metadata_drop})


def test_damaged_state_files_raise_naming_the_file(toy_state, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    cases = [
        ({"drop": "optimizer.0.exp_avg"}, r"is damaged: it lacks the tensors \['optimizer.0.exp_avg'\]"),
        ({"drop": "losses"}, r"is damaged: it lacks the tensors \['losses'\]"),
        ({"metadata_drop": "schedule"}, r"is damaged: its metadata lacks \['schedule'\]"),
        ({"losses": torch.zeros(2)}, r"is damaged: `losses` must be float32 \[3\], got torch.float32 \(2,\)"),
        ({"metadata_drop": "format"}, r"is not a sagesla.training-state file of schema 1"),
    ]
    for change, found in cases:
        damaged.write_bytes(toy_state.read_bytes())
        rewritten(damaged, **change)
        with pytest.raises(ValueError, match=rf"training state '{damaged}' {found}"):
            load_state(damaged)
    damaged.write_bytes(toy_state.read_bytes()[: toy_state.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"training state '{damaged}' is not a readable safetensors file \(trunc"):
        load_state(damaged)
    with pytest.raises(FileNotFoundError, match=r"training state '.*nope.safetensors': no such file"):
        load_state(tmp_path / "nope.safetensors")
    # A moment of the wrong shape reads but does not fit the parameter it belongs to.
    damaged.write_bytes(toy_state.read_bytes())
    rewritten(damaged, **{"optimizer.0.exp_avg": torch.zeros(4, 3)})
    loss, groups, checkpoint, _, calls = toy_run(tmp_path / "out.safetensors")
    with pytest.raises(ValueError, match=r"does not fit .*optimizer exp_avg of toy.first.weight is \(4, 3\), the para"):
        fit(loss, groups, 6, "cpu", checkpoint, load_state(damaged))
    assert not calls


def test_the_state_is_written_atomically(toy_state, tmp_path, monkeypatch):
    from sagesla import files

    state = load_state(toy_state)
    old = toy_state.read_bytes()

    def fail_halfway(tensors, path, metadata):
        pathlib.Path(path).write_bytes(b"\0" * 100)
        raise OSError("no space left on device")

    monkeypatch.setattr(files, "save_file", fail_halfway)
    with pytest.raises(OSError, match="no space left"):
        save_state(toy_state, state)
    assert toy_state.read_bytes() == old
    fresh = tmp_path / "fresh.safetensors"
    with pytest.raises(OSError, match="no space left"):
        save_state(fresh, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [toy_state.name]
    monkeypatch.undo()
    save_state(fresh, state)
    again = load_state(fresh)
    assert again.losses == state.losses and again.optimizer["param_groups"] == state.optimizer["param_groups"]
    assert torch.equal(again.optimizer["state"][0]["exp_avg"], state.optimizer["state"][0]["exp_avg"])


def test_fit_and_the_checkpoint_settings_check_their_arguments(toy_state, tmp_path):
    loss, groups, checkpoint, model, _ = toy_run(tmp_path / "state.safetensors")
    with pytest.raises(ValueError, match=r"`resume` needs `checkpoint`"):
        fit(loss, groups, 6, "cpu", None, load_state(toy_state))
    with pytest.raises(TypeError, match=r"`resume` must be a TrainingState \(load_state\) or None, got str"):
        fit(loss, groups, 6, "cpu", checkpoint, str(toy_state))
    with pytest.raises(TypeError, match=r"`checkpoint` must be a TrainingCheckpoint or None, got str"):
        fit(loss, groups, 6, "cpu", str(toy_state))
    outside = [{"params": [*model.parameters(), torch.nn.Parameter(torch.zeros(7))], "lr": 0.1}]
    with pytest.raises(ValueError, match=r"`checkpoint.modules` \(\['toy'\]\) must hold every trained parameter"):
        fit(loss, outside, 6, "cpu", checkpoint)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fit(loss, groups, 6, "cpu", TrainingCheckpoint(tmp_path / "no" / "state", {"toy": model}, checkpoint.batches))
    batches = checkpoint.batches
    with pytest.raises(ValueError, match=r"`every` must be a positive int, got 0"):
        TrainingCheckpoint("state", {"toy": model}, batches, every=0)
    with pytest.raises(ValueError, match=r"`stop_after` must be a positive int, got 0"):
        TrainingCheckpoint("state", {"toy": model}, batches, stop_after=0)
    with pytest.raises(ValueError, match=r"`modules` names must be non-empty str without '.', got 'a.b'"):
        TrainingCheckpoint("state", {"a.b": model}, batches)
    with pytest.raises(TypeError, match=r"`batches` must have state\(\) and restore\(state\), got object"):
        TrainingCheckpoint("state", {"toy": model}, object())
    with pytest.raises(ValueError, match=r"`run` must be a dict of str -> str"):
        TrainingCheckpoint("state", {"toy": model}, batches, run={"topk": 0.1})


def test_batches_restore_continues_the_draws_through_json():
    embedding = PromptEmbedding()
    source = Batches(2, 0, "cpu", text_dropout=0.5)
    source.draw(embedding)
    state = source.state()
    expected = source.draw(embedding)
    # What a state file carries: the tensors as they are, the rest through JSON.
    carried = json.loads(json.dumps({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}))
    other = Batches(2, 9, "cpu", text_dropout=0.5)
    other.restore(carried | {"generator": state["generator"].clone()})
    drawn = other.draw(embedding)
    for name in ("latents", "timesteps", "text", "velocity"):
        assert torch.equal(getattr(drawn, name), getattr(expected, name)), name
    with pytest.raises(ValueError, match=r"other settings: text_dropout 0.5 \(here 0.0\), sigma_shift 0.5 \(here"):
        Batches(2, 9, "cpu").restore(state | {"sigma_shift": 0.5})
    untouched, reference = Batches(2, 9, "cpu", text_dropout=0.5), Batches(2, 9, "cpu", text_dropout=0.5)
    with pytest.raises(ValueError, match=r"`state` is not a Batches state \(picker, generator\)"):
        untouched.restore(state | {"generator": torch.zeros(3, dtype=torch.uint8)})
    assert torch.equal(untouched.draw(embedding).latents, reference.draw(embedding).latents)


def test_train_tiny_smoke_split_by_stop_after_and_resume_writes_the_uninterrupted_weights(tmp_path, capsys):
    pytest.importorskip("diffusers")
    whole, split, state = (tmp_path / f"{name}.safetensors" for name in ("whole", "split", "state"))
    run_script("train_tiny.py", "--smoke", "--out", str(whole))
    run_script("train_tiny.py", "--smoke", "--out", str(split), "--checkpoint", str(state), "--stop-after", "2")
    assert "steps 1-2 of 4 in " in capsys.readouterr().out and not split.exists()
    halfway = load_state(state)
    assert halfway.step == 2 and halfway.steps == 4
    run_script("train_tiny.py", "--smoke", "--out", str(split), "--resume", str(state))
    assert "steps 3-4 of 4 in " in capsys.readouterr().out
    ours, theirs = load_file(split), load_file(whole)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    with safe_open(split, "pt") as f, safe_open(whole, "pt") as g:
        assert f.metadata() == g.metadata() and f.metadata()["steps"] == "4"
    done = load_state(state)
    assert done.step == 4 and done.losses[:2] == halfway.losses

    # The fine-tune trains other parameters of another model under other settings: its state does not fit.
    with pytest.raises(
        ValueError,
        match=rf"training state '{state}' does not fit this run: .*it trains 1 parameter group\(s\), this run 2",
    ):
        run_script("finetune_tiny.py", "--smoke", "--out", str(tmp_path / "sla.safetensors"), "--resume", str(state))


def test_finetune_smoke_split_by_stop_after_and_resume(tmp_path, capsys):
    pytest.importorskip("diffusers")
    out, state = tmp_path / "sla.safetensors", tmp_path / "state.safetensors"
    common = ("--smoke", "--train", "proj_l", "--out", str(out))
    run_script("finetune_tiny.py", *common, "--checkpoint", str(state), "--stop-after", "3", "--checkpoint-every", "2")
    assert "steps 1-3 of 4 in " in capsys.readouterr().out and not out.exists()
    halfway = load_state(state)
    assert halfway.step == 3 and halfway.run == {"objective": "distill", "topk": "0.1", "blocks": "64x64"}
    assert halfway.trainable == [
        [f"transformer.blocks.{i}.attn1.sla.proj_l.{p}" for i in (0, 1) for p in ["weight", "bias"]]
    ]
    with pytest.raises(ValueError, match=r"does not fit this run: .*topk '0.1' \(this run '0.25'\)"):
        run_script("finetune_tiny.py", *common, "--resume", str(state), "--topk", "0.25")
    run_script("finetune_tiny.py", *common, "--resume", str(state))
    assert "steps 4-4 of 4 in " in capsys.readouterr().out
    record = finetuned.read(out)
    assert record.steps == 4 and record.final_loss == round(sum(load_state(state).losses) / 4, 6)


@pytest.mark.parametrize("script", ["train_tiny.py", "finetune_tiny.py"])
def test_the_scripts_refuse_stop_after_without_a_state_file(tmp_path, capsys, script):
    out = tmp_path / "out.safetensors"
    for flags, found in (
        (["--stop-after", "2"], "--stop-after needs --checkpoint (or --resume)"),
        (["--checkpoint", str(out)], f"--checkpoint must differ from --out, got '{out}' for both"),
        (["--resume", str(tmp_path / "nope")], "argument --resume: no file"),
        (["--checkpoint-every", "0"], "argument --checkpoint-every: must be an int >= 1, got '0'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            run_script(script, "--smoke", "--out", str(out), *flags)
        assert exit_.value.code == 2 and found in capsys.readouterr().err
