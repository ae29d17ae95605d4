"""Training-state files: what ``sagesla.embedded.training.fit`` needs to continue a run where it stopped, so a long
run split over several calls (or machines) ends where one uninterrupted run would.

One safetensors file, written atomically (``sagesla.files.save_file_atomic``) and read without unpickling:

- tensors: ``modules.{name}.{key}`` each module's state dict (fp32 as trained: the trainable and the frozen
  parameters, the buffers); ``optimizer.{index}.{key}`` the optimizer's per-parameter state (AdamW: ``exp_avg``,
  ``exp_avg_sq`` [like the parameter], ``step`` [] fp32), ``index`` numbering the parameters of all groups in
  order as ``torch.optim.Optimizer.state_dict`` does; ``losses`` [step] fp32, the loss of every step done;
  ``batches.{key}`` the tensors of ``Batches.state()`` (``generator``: the torch generator's state, uint8).
- metadata (strings; JSON where noted): ``format``, ``schema_version``, ``steps`` (the run's total), ``step`` (done),
  ``modules`` (JSON: names), ``trainable`` (JSON: per optimizer group, its parameters' ``{module}.{key}`` names),
  ``optimizer`` (JSON: ``param_groups``, the hyperparameters, and which state tensors each parameter has),
  ``schedule`` (JSON: the LR scheduler's ``state_dict()``), ``batches`` (JSON: the rest of ``Batches.state()``) and
  ``run`` (JSON: other settings the run was made with).
"""

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from sagesla import validation
from sagesla.files import save_file_atomic

FORMAT = "sagesla.training-state"
SCHEMA_VERSION = 1
METADATA_KEYS = ("format", "schema_version", "steps", "step", "modules", "trainable", "optimizer", "schedule")
METADATA_KEYS += ("batches", "run")
# Steps between two writes of the state file, unless told otherwise: about a minute of the shipped runs on an H100.
DEFAULT_EVERY = 500
# How many mismatching tensors a "does not fit" message lists.
LISTED = 5


@dataclass(frozen=True)
class TrainingCheckpoint:
    """Where and how often ``fit`` writes the training state, and what it holds besides the optimizer's.

    Attributes:
        path: the state file, rewritten atomically every ``every`` steps (counted from the run's first step, so a
            resumed run writes at the same steps) and after the last step of the call.
        modules: name (no ".") -> module whose whole state dict the file holds; every parameter ``fit`` trains
            must be in one of them, e.g. ``{"transformer": model, "prompts": prompts}``.
        batches: the batch source (``sagesla.embedded.training.Batches``: ``state()`` and ``restore(state)``).
        every: steps between writes.
        stop_after: end the call after this many of its steps (writing the state), so a job with a time limit
            ends cleanly; None: run to the last step.
        run: other settings that define the run (e.g. a fine-tune's topk); a state made under other values does
            not fit.
    Raises:
        TypeError: a module is not an ``nn.Module`` or ``batches`` has no ``state`` / ``restore``.
        ValueError: ``every`` or ``stop_after`` is not a positive int, ``modules`` is empty or a name holds a ".",
            or ``run`` is not a dict of str.
    """

    path: str | os.PathLike
    modules: Mapping[str, nn.Module]
    batches: object
    every: int = DEFAULT_EVERY
    stop_after: int | None = None
    run: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        validation.check_positive("every", self.every)
        if self.stop_after is not None:
            validation.check_positive("stop_after", self.stop_after)
        if not isinstance(self.modules, Mapping) or not self.modules:
            raise ValueError(f"`modules` must be a non-empty dict of name -> nn.Module, got {self.modules!r}")
        for name, module in self.modules.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"`modules` names must be non-empty str without '.', got {name!r}")
            if not isinstance(module, nn.Module):
                raise TypeError(f"`modules[{name!r}]` must be an nn.Module, got {type(module).__name__}")
        if not all(callable(getattr(self.batches, method, None)) for method in ("state", "restore")):
            raise TypeError(f"`batches` must have state() and restore(state), got {type(self.batches).__name__}")
        if not isinstance(self.run, Mapping) or not all(isinstance(v, str) for v in (*self.run, *self.run.values())):
            raise ValueError(f"`run` must be a dict of str -> str, got {self.run!r}")


@dataclass(frozen=True)
class TrainingState:
    """Everything a training run needs to continue where it stopped: what a state file holds.

    Attributes:
        steps: the run's total optimizer steps.
        losses: the loss of every step done (``step`` of them).
        modules: module name -> its state dict.
        trainable: per optimizer group, its parameters' ``{module}.{key}`` names, in the group's order.
        optimizer: ``torch.optim.Optimizer.state_dict()``: ``state`` (parameter index -> name -> tensor) and
            ``param_groups`` (hyperparameters; ``params`` the indices).
        schedule: the LR scheduler's ``state_dict()`` (JSON data).
        batches: ``Batches.state()``.
        run: ``TrainingCheckpoint.run`` of the run that wrote it.
        path: the file it was read from ("" for one captured in memory); errors name it.
    """

    steps: int
    losses: list[float]
    modules: dict[str, dict[str, torch.Tensor]]
    trainable: list[list[str]]
    optimizer: dict
    schedule: dict
    batches: dict
    run: dict[str, str]
    path: str = ""

    @property
    def step(self) -> int:
        """Steps done."""
        return len(self.losses)


def save_state(path: str | os.PathLike, state: TrainingState) -> None:
    """Write ``state`` to ``path`` atomically: a reader (``load_state``) finds the previous file or this one, whole,
    even when writing fails or the machine stops halfway (no partial file is left).

    Raises:
        ValueError: an optimizer state entry is not a tensor.
        OSError: ``path`` cannot be written (``sagesla.files.check_output_path``), before anything is written.
    """
    tensors = {
        f"modules.{name}.{key}": _stored(value)
        for name, module in state.modules.items()
        for key, value in module.items()
    }
    kept = {}
    for index, entries in state.optimizer["state"].items():
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"optimizer state {key!r} of parameter {index} must be a tensor, got {value!r}")
            tensors[f"optimizer.{index}.{key}"] = _stored(value)
        kept[str(index)] = sorted(entries)
    tensors["losses"] = torch.tensor(state.losses, dtype=torch.float32)
    batches = {key: value for key, value in state.batches.items() if not isinstance(value, torch.Tensor)}
    tensors |= {f"batches.{k}": _stored(v) for k, v in state.batches.items() if isinstance(v, torch.Tensor)}
    metadata = {
        "format": FORMAT,
        "schema_version": str(SCHEMA_VERSION),
        "steps": str(state.steps),
        "step": str(state.step),
        "modules": json.dumps(list(state.modules)),
        "trainable": json.dumps(state.trainable),
        "optimizer": json.dumps({"param_groups": state.optimizer["param_groups"], "state": kept}),
        "schedule": json.dumps(state.schedule),
        "batches": json.dumps(batches),
        "run": json.dumps(dict(state.run)),
    }
    save_file_atomic(tensors, path, metadata)


def load_state(path: str | os.PathLike) -> TrainingState:
    """The training state ``save_state`` wrote to ``path`` (tensors on the CPU; ``fit(..., resume=)`` checks that it
    fits the run and moves them).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming ``path``: not a readable safetensors file (truncated?), not a training state of this
            schema, or a metadata entry or tensor is missing or malformed.
    """
    text = os.fspath(path)
    if not os.path.isfile(text):
        raise FileNotFoundError(f"training state {text!r}: no such file")
    try:
        with safe_open(text, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"training state {text!r} is not a readable safetensors file (truncated?): {error}") from error
    if metadata.get("format") != FORMAT or metadata.get("schema_version") != str(SCHEMA_VERSION):
        found = (metadata.get("format"), metadata.get("schema_version"))
        raise ValueError(
            f"training state {text!r} is not a {FORMAT} file of schema {SCHEMA_VERSION} (format, schema: {found}): "
            "write one with fit(..., checkpoint=), the training scripts' --checkpoint"
        )
    try:
        return _parse(text, metadata, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"training state {text!r} is damaged: {_described(error)}") from error


def capture(
    checkpoint: TrainingCheckpoint,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    steps: int,
    losses: list[float],
) -> TrainingState:
    """The state of a run of ``steps`` steps after ``len(losses)`` of them (tensors shared with the run, not copied).

    Raises:
        ValueError: a parameter of the optimizer is in none of ``checkpoint.modules``.
    """
    return TrainingState(
        steps=steps,
        losses=list(losses),
        modules={name: module.state_dict() for name, module in checkpoint.modules.items()},
        trainable=trainable_names(checkpoint.modules, optimizer),
        optimizer=optimizer.state_dict(),
        schedule=schedule.state_dict(),
        batches=checkpoint.batches.state(),
        run=dict(checkpoint.run),
    )


def trainable_names(modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Per optimizer group, its parameters' ``{module}.{key}`` names.

    Raises:
        ValueError: a parameter is in none of ``modules``.
    """
    names = {id(p): f"{name}.{key}" for name, module in modules.items() for key, p in module.named_parameters()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if id(parameter) not in names:
                raise ValueError(
                    f"`checkpoint.modules` ({list(modules)}) must hold every trained parameter, got one of shape "
                    f"{tuple(parameter.shape)} outside them"
                )
    return [[names[id(parameter)] for parameter in group["params"]] for group in optimizer.param_groups]


def check_fits(state: TrainingState, fresh: TrainingState) -> None:
    """Raise unless ``state`` (read from a file) continues the run ``fresh`` (``capture`` of it before its first step)
    describes: the same total steps, modules with the same keys, shapes and dtypes, the same parameters trained in
    the same groups at the same peak learning rates, and the same ``run`` settings.

    Raises:
        ValueError: naming ``state.path`` and every difference found.
    """
    problems = []
    if state.steps != fresh.steps:
        problems.append(f"its run has {state.steps} steps, this one {fresh.steps} (resume with the same total steps)")
    if state.step > state.steps:
        problems.append(f"it records {state.step} steps done, more than its {state.steps}")
    if set(state.modules) != set(fresh.modules):
        problems.append(f"it holds the modules {sorted(state.modules)}, this run {sorted(fresh.modules)}")
    for name in sorted(set(state.modules) & set(fresh.modules)):
        problems += _tensor_differences(name, state.modules[name], fresh.modules[name])
    if state.trainable != fresh.trainable:
        problems.append(_trainable_difference(state.trainable, fresh.trainable))
    else:
        problems += _optimizer_differences(state, fresh)
        peaks = [group.get("max_lr", group.get("lr")) for group in state.optimizer["param_groups"]]
        ours = [group.get("max_lr", group.get("lr")) for group in fresh.optimizer["param_groups"]]
        if peaks != ours:
            problems.append(f"its groups peak at lr {peaks}, this run's at {ours}")
    if state.run != fresh.run:
        differ = sorted(key for key in {*state.run, *fresh.run} if state.run.get(key) != fresh.run.get(key))
        problems += [f"{key} {state.run.get(key)!r} (this run {fresh.run.get(key)!r})" for key in differ]
    if problems:
        raise ValueError(f"training state {state.path!r} does not fit this run: {'; '.join(problems)}")


def restore(
    state: TrainingState,
    checkpoint: TrainingCheckpoint,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Put the run where ``state`` left it, in place: the modules' parameters and buffers, the optimizer's state and
    hyperparameters, the schedule and the batch source. ``check_fits`` it first.

    Raises:
        ValueError: naming ``state.path``: the batch source was drawn with other settings.
    """
    try:
        checkpoint.batches.restore(state.batches)
    except ValueError as error:
        raise ValueError(f"training state {state.path!r} does not fit this run: {error}") from error
    for name, module in checkpoint.modules.items():
        module.load_state_dict(state.modules[name])
    optimizer.load_state_dict(state.optimizer)
    schedule.load_state_dict(state.schedule)


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    # A copy on the CPU: safetensors refuses tensors that share memory (views of one parameter).
    return tensor.detach().to("cpu", copy=True).contiguous()


def _parse(path: str, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> TrainingState:
    """The ``TrainingState`` of a file's metadata and tensors; KeyError / ValueError / TypeError where one lacks."""
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"its metadata lacks {missing}")
    names = json.loads(metadata["modules"])
    modules = {name: _prefixed(tensors, f"modules.{name}.") for name in names}
    optimizer = json.loads(metadata["optimizer"])
    wanted = [f"optimizer.{index}.{key}" for index, keys in optimizer["state"].items() for key in keys]
    lacking = [key for key in (*wanted, "losses") if key not in tensors]
    if lacking:
        raise ValueError(f"it lacks the tensors {lacking[:LISTED]}{' ...' if len(lacking) > LISTED else ''}")
    state = {int(index): _prefixed(tensors, f"optimizer.{index}.") for index in optimizer["state"]}
    groups = optimizer["param_groups"]
    for group in groups:
        # JSON has no tuples; torch's optimizers keep betas as one.
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    losses = tensors["losses"]
    if losses.dtype != torch.float32 or losses.dim() != 1 or len(losses) != int(metadata["step"]):
        raise ValueError(f"`losses` must be float32 [{metadata['step']}], got {losses.dtype} {tuple(losses.shape)}")
    batches = json.loads(metadata["batches"]) | _prefixed(tensors, "batches.")
    return TrainingState(
        steps=int(metadata["steps"]),
        losses=losses.tolist(),
        modules=modules,
        trainable=json.loads(metadata["trainable"]),
        optimizer={"state": state, "param_groups": groups},
        schedule=json.loads(metadata["schedule"]),
        batches=batches,
        run=json.loads(metadata["run"]),
        path=path,
    )


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}


def _tensor_differences(name: str, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> list[str]:
    """What differs between two state dicts of module ``name``: keys, then shapes and dtypes (a few listed)."""
    problems = []
    for what, keys in (
        ("lacks", [k for k in ours if k not in theirs]),
        ("has extra", [k for k in theirs if k not in ours]),
    ):
        if keys:
            listed = ", ".join(f"{name}.{key}" for key in keys[:LISTED])
            problems.append(
                f"it {what} {len(keys)} tensor(s) of {name} ({listed}{' ...' if len(keys) > LISTED else ''})"
            )
    unlike = [
        f"{name}.{key} is {theirs[key].dtype} {tuple(theirs[key].shape)} there, {value.dtype} {tuple(value.shape)} here"
        for key, value in ours.items()
        if key in theirs and (theirs[key].shape != value.shape or theirs[key].dtype != value.dtype)
    ]
    if unlike:
        problems.append(
            f"{len(unlike)} tensor(s) differ: {'; '.join(unlike[:LISTED])}{' ...' if len(unlike) > LISTED else ''}"
        )
    return problems


def _optimizer_differences(state: TrainingState, fresh: TrainingState) -> list[str]:
    """Optimizer state tensors of ``state`` unlike its parameters (same trainable names in both assumed)."""
    names = [name for group in fresh.trainable for name in group]
    shapes = [fresh.modules[name.split(".", 1)[0]][name.split(".", 1)[1]].shape for name in names]
    problems = []
    for index, entries in state.optimizer["state"].items():
        if not 0 <= index < len(names):
            problems.append(f"it holds optimizer state of parameter {index}, this run trains {len(names)}")
            continue
        problems += [
            f"optimizer {key} of {names[index]} is {tuple(value.shape)}, the parameter {tuple(shapes[index])}"
            for key, value in entries.items()
            if value.dim() and value.shape != shapes[index]
        ]
    return problems[:LISTED]


def _trainable_difference(theirs: list[list[str]], ours: list[list[str]]) -> str:
    """How two runs' trained parameters differ (group count, then the names each trains alone)."""
    if len(theirs) != len(ours):
        return f"it trains {len(theirs)} parameter group(s), this run {len(ours)}"
    flat_theirs, flat_ours = [n for g in theirs for n in g], [n for g in ours for n in g]
    only_there = [n for n in flat_theirs if n not in set(flat_ours)]
    only_here = [n for n in flat_ours if n not in set(flat_theirs)]
    if not only_there and not only_here:
        return "it trains the same parameters in other groups or another order"
    parts = [
        f"{len(names)} only {where} ({', '.join(names[:LISTED])}{' ...' if len(names) > LISTED else ''})"
        for where, names in (("there", only_there), ("here", only_here))
        if names
    ]
    return f"it trains other parameters: {'; '.join(parts)}"


def _described(error: BaseException) -> str:
    return f"missing entry {error}" if isinstance(error, KeyError) else str(error)


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """The training scripts' options to split a run: ``--checkpoint``, ``--checkpoint-every``, ``--resume`` and
    ``--stop-after`` (``check_resume_arguments`` resolves them once parsed)."""
    from sagesla.cli import input_file, output_file, positive_int

    parser.add_argument(
        "--checkpoint",
        type=output_file,
        help="write the training state there every --checkpoint-every steps and when the run stops "
        "(default with --resume: the --resume file)",
    )
    parser.add_argument(
        "--checkpoint-every", type=positive_int, default=DEFAULT_EVERY, help="steps between writes (%(default)s)"
    )
    parser.add_argument(
        "--resume", type=input_file, help="continue the run a --checkpoint file holds (same --steps and settings)"
    )
    parser.add_argument(
        "--stop-after",
        type=positive_int,
        help="stop after this many steps of this run, writing the state; --out is written only once all --steps "
        "are done",
    )


def check_resume_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, out: str | os.PathLike) -> None:
    """Resolve ``args.checkpoint`` (default: the ``--resume`` file); ``parser.error`` (one line, exit status 2)
    for ``--stop-after`` without a state file, or a state file that is ``out``, the weights file."""
    args.checkpoint = args.checkpoint or args.resume
    if args.stop_after is not None and args.checkpoint is None:
        parser.error("--stop-after needs --checkpoint (or --resume): the file the state goes to")
    if args.checkpoint is not None and os.path.abspath(args.checkpoint) == os.path.abspath(out):
        parser.error(f"--checkpoint must differ from --out, got {str(out)!r} for both")
