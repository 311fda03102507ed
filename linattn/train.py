"""Training and evaluation of a causal LM on a synthetic task: the main job behind `linattn train`.

A run is (LMConfig, Task, TrainConfig). Its data is a pure function of (seed, step): batch
`step` of the "train" split (see linattn.tasks.batch), and evaluation draws from the disjoint
"test" split, so a resumed run sees exactly the batches an uninterrupted one would and
reaches the same weights (bitwise on the same machine and thread count).

Files written into the run directory:
    config.json          {"model": LMConfig.to_dict(), "task": Task.to_dict(), "train": TrainConfig}
    metrics.jsonl        one line per log interval (and per evaluation): the learning curve
    metrics.json         final test "accuracy", "exact_match", "loss", steps, tokens/s, parameters, ...
    model.safetensors    final weights
    checkpoint.pt        model + optimizer + RNG + step, for --resume (written atomically)
    curves.png           loss and accuracy over steps

Loss is cross-entropy on answer tokens only; "accuracy" is the fraction of answer tokens
predicted exactly (argmax), "exact_match" the fraction of sequences whose answer tokens are
all right. On CUDA with dtype "bfloat16" the forward runs under bf16 autocast (float32
master weights) and the model's backend "auto" takes the Triton kernels.

Compiling (TrainConfig.compile, `linattn train --compile MODE`): the model's logits at the
answer positions (CausalLM.answer_logits, and so its backward) run as one
torch.compile(fullgraph=True) graph, its ops as torch custom ops (linattn.ops.custom_ops),
on inputs of one shape per sequence length (a smaller evaluation batch is padded); see
compile_model and CompiledLM. The loss and the optimizer stay eager.

Sequence parallelism (train(..., sequence_parallel=True), `linattn train --sequence-parallel`
under torchrun): the processes torchrun starts form one process group (gloo on CPU, NCCL on
CUDA, one GPU per process: cuda:LOCAL_RANK) that holds ONE model replica, each sequence cut
along time into contiguous slices, one per rank (LASP-2, see linattn.parallel). Every rank
draws the same batch (batches are a pure function of (seed, step)) and keeps its slice of
the ids, targets and answer mask; its loss is the sum over its answer tokens divided by the
batch's answer-token count, so the ranks' losses and gradients add up to the
single-process ones: gradients are all-reduced (SUM), then every rank clips and steps the
same optimizer on the same numbers. Rank 0 alone writes files and shows progress.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .models import CausalLM, LMConfig
from .tasks import Batch, Task, task_from_dict
from .tasks.batch import BOS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPILE_MODES = ("none", "default", "reduce-overhead")
CONFIG_FILE, CURVE_FILE, METRICS_FILE = "config.json", "metrics.jsonl", "metrics.json"
WEIGHTS_FILE, CHECKPOINT_FILE, PLOT_FILE = "model.safetensors", "checkpoint.pt", "curves.png"
RUN_FILES = (CONFIG_FILE, CURVE_FILE, METRICS_FILE, WEIGHTS_FILE, CHECKPOINT_FILE, PLOT_FILE)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = -1  # -1: 5% of steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    beta2: float = 0.95  # AdamW's second-moment decay (beta1 is 0.9)
    decay_all: bool = False  # weight decay on every parameter (False: matrices only)
    lr_period: int = 1  # the learning rate changes every lr_period steps (Zoology: once an epoch)
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end; -1: about 10 evaluations (every steps // 10)
    eval_batches: int = 8
    ckpt_every: int = 100
    time_limit_s: float = 0.0  # 0: none; else stop training after this many seconds
    # Sequence-length warm-up: this fraction of the steps trains on the task at its shortest
    # length (Task.shortest(): MQAR without filler), the rest at full length. Recall learned
    # short carries over: on MQAR (16 pairs) a Gated DeltaNet still near chance (2%) after 1000
    # steps at T = 256 reaches 94% in 400 steps at T = 64, and 97.6% at T = 256 from there.
    seq_len_warmup: float = 0.0
    # torch.compile the model (compile_model): "none", "default" or "reduce-overhead" (CUDA
    # graphs: one launch per graph, for small, launch-bound models)
    compile: str = "none"
    # Auxiliary losses (Mixture-of-Memories' load balancing, `aux_loss` of a mixer) join the
    # training loss times this coefficient.
    aux_loss_coef: float = 0.01
    # Early stop: once a periodic evaluation (eval_every) reaches this test accuracy (0: off).
    stop_at_accuracy: float = 0.0

    def validate(self) -> "TrainConfig":
        positive = ("steps", "batch_size", "log_every", "eval_batches", "ckpt_every", "lr_period")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < -1:
            raise ValueError(f"eval_every must be >= -1 (-1: about 10 evaluations), got {self.eval_every}")
        for name in ("time_limit_s", "weight_decay", "grad_clip", "min_lr_ratio", "aux_loss_coef",
                     "stop_at_accuracy"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.seq_len_warmup < 1):
            raise ValueError(f"seq_len_warmup must be in [0, 1), got {self.seq_len_warmup}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {self.beta2}")
        if not isinstance(self.decay_all, bool):
            raise ValueError(f"decay_all must be a bool, got {self.decay_all!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, "
                             f"got {self.compile!r}")
        if not (0 <= self.seed < 2**30):
            raise ValueError(f"seed must be in [0, 2**30), got {self.seed}")
        resolve_device(self.device)
        return self

    @property
    def eval_interval(self) -> int:
        """Steps between test evaluations during training (0: at the end only)."""
        return max(1, self.steps // 10) if self.eval_every < 0 else self.eval_every

    @property
    def warmup(self) -> int:
        return max(1, round(0.05 * self.steps)) if self.warmup_steps < 0 else self.warmup_steps

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based): linear warmup, then cosine to min_lr_ratio,
        held for lr_period steps at a time (the value at the period's first step)."""
        step -= step % self.lr_period
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training setting {', '.join(unknown)}")
        return TrainConfig(**d)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast (weights stay float32), or nothing for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ------------------------------------------------------------------------------ the model

def build_model(model_cfg, device: torch.device, seed: int):
    """CausalLM(model_cfg) on `device`, its initial weights a function of `seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CausalLM(model_cfg)
    return model.to(device)


def compile_model(model, mode: str, device: torch.device, rows: int = 0):
    """model itself for mode "none", else a CompiledLM: model.answer_logits as one
    torch.compile(fullgraph=True) graph (a graph break is an error) on the same parameters,
    batches of fewer than `rows` rows (the run's batch size) padded to it. On CUDA, inductor
    with `mode` ("reduce-overhead" replays CUDA graphs); on the CPU the graph is captured with
    backend="aot_eager" (AOTAutograd, no code generation), whatever the mode: inductor's C++
    code generation takes minutes per model on a small CPU, and CUDA graphs need CUDA.
    ValueError for "reduce-overhead" when a mixer says CUDA graphs cannot capture it
    (Mixer.cuda_graphs_refused), on every device, before anything is compiled."""
    if mode == "none":
        return model
    if mode == "reduce-overhead":
        refused = {type(m).__name__: m.cuda_graphs_refused for m in model.modules()
                   if getattr(m, "cuda_graphs_refused", None)}
        if refused:
            name, why = next(iter(refused.items()))
            raise ValueError(f"compile mode 'reduce-overhead' (CUDA graphs) cannot capture {name}: {why}")
    if device.type == "cuda":
        graph = torch.compile(AnswerLogits(model), mode=mode, fullgraph=True)
    else:
        graph = torch.compile(AnswerLogits(model), backend="aot_eager", fullgraph=True)
    return CompiledLM(graph, cuda_graphs=device.type == "cuda" and mode == "reduce-overhead",
                      rows=rows)


class AnswerLogits(torch.nn.Module):
    """The module compile_model compiles: forward(input_ids [B, T], positions [N]) =
    model.answer_logits(input_ids, positions) [N, V], the head at the N positions only (the
    [B, T, V] logits never exist)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.answer_logits(input_ids, positions)


class CompiledLM(torch.nn.Module):
    """A compiled AnswerLogits fed inputs of as few shapes as a run allows.

    answer_logits(input_ids [B, T], positions [N] flat indices b * T + t) -> [N, V], as
    CausalLM.answer_logits. The graph sees ids [rows, T] and positions [answers at T]: rows
    the most batch rows seen (at least `rows`, the run's batch size), answers the most
    positions seen at that T. A smaller batch (a fixed test set's last one) gets BOS rows
    after its own, its positions 0s after its own, and the result's rows past N are dropped.
    Every row is its own sequence and every logit row its own position, so padding changes no
    real row (up to the rounding order of a kernel over more rows). A new shape would compile
    another graph and, under CUDA graphs, record another one and warm it up inside the graphs'
    private memory pool, where the Triton ops' per-shape chunk layouts (cached across calls)
    would be built: cudagraph trees refuse such untracked tensors (see _warm_outside_graphs).

    cuda_graphs (mode "reduce-overhead" on CUDA): each call begins a cudagraph-trees step
    (torch.compiler.cudagraph_mark_step_begin), so a call is one training step's forward,
    whose backward runs before the next call, or one evaluation batch; the previous step's
    graph outputs (its gradients) are given up, and the training step sets them to None
    before its backward. The marks are process-wide (torch._dynamo.reset() clears them): a
    reduce-overhead model of one's own in the same process then needs them too.
    """

    def __init__(self, graph, *, cuda_graphs: bool, rows: int = 0):
        super().__init__()
        self.graph = graph  # torch.compile(AnswerLogits(model)): train() / eval() reach the model
        self.cuda_graphs = cuda_graphs
        self.rows = rows
        self.answers = {}  # T -> the most positions seen at that length

    def answer_logits(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        N = positions.shape[0]
        self.rows = max(self.rows, B)
        self.answers[T] = max(self.answers.get(T, 0), N)
        if B < self.rows:
            input_ids = torch.cat([input_ids, input_ids.new_full((self.rows - B, T), BOS)])
        if N < self.answers[T]:
            positions = torch.cat([positions, positions.new_zeros(self.answers[T] - N)])
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self.graph(input_ids, positions)[:N]

    forward = answer_logits


def short_task_of(task: Task, cfg: "TrainConfig") -> Task:
    """The task the sequence-length warm-up trains on (task itself when there is none)."""
    return task.shortest() if cfg.seq_len_warmup else task


def _warm_outside_graphs(model, tasks, cfg, device: torch.device, dtype: torch.dtype) -> None:
    """One eager forward + backward per batch shape the run will use (gradients then cleared):
    cfg.batch_size rows of each task's length, every shape the CompiledLM's graph sees, in
    training and in evaluation (its smaller batches are padded to that; a forward without
    gradients reads the same layouts). The Triton ops cache each shape's chunk layout (index
    tensors kept across calls); built inside the first call of a reduce-overhead model they
    would sit in CUDA graphs' private memory pool, which may hold only the graphs' own
    tensors: cudagraph trees refuse the untracked ones ("Detected 8 tensor(s) in the
    cudagraph pool not tracked as outputs": a layout's buffers, two layouts' for GLA)."""
    for i, t in enumerate(tasks):
        if any(t is u for u in tasks[:i]):
            continue
        batch = t.batch("train", cfg.seed, 0, cfg.batch_size).to(device)
        loss, _ = batch_loss(model, batch, device, dtype)
        loss.backward()
    model.zero_grad(set_to_none=True)


def model_config_for(task: Task, **model_kwargs):
    """An LMConfig sized for `task` (vocab_size and max_seq_len from it), validated."""
    cfg = LMConfig(vocab_size=task.vocab_size, max_seq_len=max(task.seq_len, 16), **model_kwargs)
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------- loss, metrics

@dataclass(frozen=True)
class AnswerStats:
    """A batch's answer loss and counts, kept on the device until the host asks for them.

    values: [3] float64 on the batch's device: the mean answer loss, the answer tokens
        predicted right (argmax), the sequences with every answer token right.
    tokens, sequences: the batch's answer tokens and sequences (the host knows them).
    resolve() reads values once: (the mean loss as a float, the counts "tokens", "correct",
    "sequences", "exact" as Python ints).
    """

    values: torch.Tensor
    tokens: int
    sequences: int

    def resolve(self) -> tuple[float, dict]:
        loss, correct, exact = self.values.tolist()  # the one device read
        return loss, {"tokens": self.tokens, "correct": int(correct), "sequences": self.sequences,
                      "exact": int(exact)}


def answer_loss(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict]:
    """Cross-entropy over answer tokens, and their accuracy.

    logits: [B, T, V] (any float dtype; the loss is computed in float32); batch tensors [B, T].
    Returns (mean loss over answer tokens: scalar float32 tensor, counts) where counts holds
    python numbers: "tokens" (answer tokens), "correct" (argmax right), "sequences",
    "exact" (sequences with every answer token right).
    """
    loss, stats = picked_answer_loss(batch.at_answers(logits), batch)
    return loss, stats.resolve()[1]


def picked_answer_loss(picked: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, AnswerStats]:
    """answer_loss from the logits at the answer positions only: picked [N, V], the rows of
    batch.answer_index in its order (CausalLM.answer_logits). Returns (the mean loss: a
    scalar float32 tensor, its AnswerStats); nothing here waits for the device."""
    B, T = batch.answer_mask.shape
    index = batch.answer_index  # [N] flat positions b * T + t
    targets = batch.at_answers(batch.targets)  # [N]
    loss = F.cross_entropy(picked.float(), targets)
    with torch.no_grad():
        right = picked.argmax(dim=-1) == targets  # [N]
        wrong_per_seq = torch.zeros(B, dtype=torch.long, device=index.device)
        wrong_per_seq.index_add_(0, index // T, (~right).long())  # [B]; index // T: the sequence
        values = torch.stack([loss.detach().double(), right.sum().double(),
                              (wrong_per_seq == 0).sum().double()])  # [3]
    return loss, AnswerStats(values, batch.answer_count, B)


def parallel_answer_loss(logits: torch.Tensor, batch: Batch, sp) -> tuple[torch.Tensor, AnswerStats]:
    """answer_loss under sequence parallelism: every rank holds the whole batch and the logits
    of its slice of it.

    logits: [B, T_r, V], the model's output on sp.split(batch.input_ids); batch tensors [B, T].
    Returns (this rank's part of the loss: the sum of its answer tokens' cross-entropies (in
    float32) over the batch's answer-token count -- the parts, and their gradients, add up
    over ranks to answer_loss's --, and the whole batch's AnswerStats: its mean loss and
    answer_loss's counts). One all-reduce of B + 2 numbers.
    """
    targets, mask = sp.split(batch.targets), sp.split(batch.answer_mask)  # [B, T_r]
    tokens = batch.answer_count  # the whole batch's, known to every rank
    loss_sum = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")
    with torch.no_grad():
        right = logits.argmax(dim=-1) == targets  # [B, T_r]
        sums = torch.cat([loss_sum.detach().double().view(1), (right & mask).sum().double().view(1),
                          (~right & mask).sum(dim=1).double()])  # [2 + B]: loss, correct, wrong per seq
        dist.all_reduce(sums, group=sp.group)
        values = torch.stack([sums[0] / tokens, sums[1], (sums[2:] == 0).sum().double()])  # [3]
    return loss_sum / tokens, AnswerStats(values, tokens, mask.shape[0])


def batch_loss(model, batch: Batch, device: torch.device, dtype: torch.dtype,
               sp=None) -> tuple[torch.Tensor, AnswerStats]:
    """The model's answer loss on batch: (loss to backpropagate, its AnswerStats: the batch's
    mean loss and answer_loss's counts, read with .resolve()). sp: a SequenceParallelContext
    the model runs under (the model sees this rank's slice; see parallel_answer_loss), or
    None. Without sp nothing here waits for the device: the answer rows are gathered at
    batch.answer_index, whose length the host knows."""
    with autocast(device, dtype):
        if sp is not None:
            logits = model(sp.split(batch.input_ids))  # [B, T_r, V]
        elif isinstance(model, (CausalLM, CompiledLM)):  # the head at the answer positions only
            picked = model.answer_logits(batch.input_ids, batch.answer_index)  # [N, V]
        else:
            picked = batch.at_answers(model(batch.input_ids))  # [B, T, V] -> [N, V]
    if sp is not None:
        return parallel_answer_loss(logits, batch, sp)
    return picked_answer_loss(picked, batch)


@torch.no_grad()
def evaluate(model, task: Task, *, seed: int, batches: int, batch_size: int,
             device: torch.device, dtype: torch.dtype = torch.float32, split: str = "test",
             sp=None) -> dict:
    """Mean answer loss, token accuracy and exact match over `batches` batches of `split`.

    sp: the SequenceParallelContext the model runs under (every rank of its group calls
    evaluate together and gets the same numbers), or None.
    Returns {"loss", "accuracy", "exact_match", "answer_tokens", "sequences"}.
    """
    was_training = model.training
    model.eval()
    total_loss, tokens, correct, seqs, exact = 0.0, 0, 0, 0, 0
    for index in range(batches):
        batch = task.batch(split, seed, index, batch_size).to(device)
        loss, c = batch_loss(model, batch, device, dtype, sp)[1].resolve()
        total_loss += loss * c["tokens"]
        tokens, correct, seqs, exact = (tokens + c["tokens"], correct + c["correct"],
                                        seqs + c["sequences"], exact + c["exact"])
    model.train(was_training)
    return {"loss": total_loss / tokens, "accuracy": correct / tokens,
            "exact_match": exact / seqs, "answer_tokens": tokens, "sequences": seqs}


# ------------------------------------------------------------------------------ file I/O

def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temp file beside `path`, then os.replace it into place. The
    file gets the permissions a plain open() would give it (0o666 less the umask; mkstemp's
    temp files are 0o600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def run_config_dict(model_cfg, task: Task, train_cfg: TrainConfig) -> dict:
    return {"model": model_cfg.to_dict(), "task": task.to_dict(), "train": asdict(train_cfg)}


def load_run(out_dir) -> tuple:
    """(LMConfig, Task, TrainConfig) from a run directory's config.json."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{out_dir} is not a run directory (no {CONFIG_FILE})")
    d = read_run_config(path)
    try:
        return LMConfig.from_dict(d["model"]), task_from_dict(d["task"]), TrainConfig.from_dict(d["train"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid run config: {_one_line(e)}") from None


def read_run_config(path: Path) -> dict:
    """A run's config.json as a dict with its "model", "task" and "train" sections; ValueError
    naming the file when it is not JSON or a section is missing."""
    try:
        d = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({_one_line(e)})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a run config: expected a JSON object, got {type(d).__name__}")
    missing = [s for s in ("model", "task", "train") if not isinstance(d.get(s), dict)]
    if missing:
        raise ValueError(f"{path} is not a run config: no {', '.join(missing)} section")
    if "name" not in d["task"]:
        raise ValueError(f"{path} is not a run config: its task section has no name")
    return d


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (the first line, whitespace collapsed)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return " ".join(text.split())


def save_weights(model, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # tied embeddings share storage: safetensors wants each tensor once
    seen, unique = {}, {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.stride())
        if key in seen:
            continue
        seen[key] = k
        unique[k] = v
    atomic_write(path, lambda tmp: save_file(unique, tmp))


def load_weights(model, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise ValueError(f"{path} is not a readable safetensors file ({_one_line(e)})") from None
    _check_shapes(state, model, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    shared = {n for n, _ in _tied_names(model)}
    missing = [m for m in missing if m not in shared]
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing {missing}, unexpected {unexpected}")


def _check_shapes(state: dict, model, path: Path) -> None:
    """ValueError naming `path` when a tensor of `state` has another shape than the model's
    (weights of another run)."""
    own = model.state_dict()
    for name, t in state.items():
        if name in own and tuple(t.shape) != tuple(own[name].shape):
            raise ValueError(f"{path} does not match the run's {CONFIG_FILE}: {name} is "
                             f"{list(t.shape)} in the file, {list(own[name].shape)} in the model "
                             "(weights of another run?)")


def _tied_names(model):
    """(name, first_name) for state-dict entries that share storage with an earlier one."""
    first = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride())
        if key in first:
            yield name, first[key]
        else:
            first[key] = name


def _save_checkpoint(path: Path, step: int, model, optimizer, elapsed_s: float) -> None:
    """Everything a resumed run needs (the data position is the step: batches are a pure
    function of (seed, step)), written atomically."""
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "torch_rng": torch.get_rng_state(), "elapsed_s": elapsed_s}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(path: Path, model, optimizer, device: torch.device) -> tuple[int, float]:
    """Restore model, optimizer and RNG state in place; returns (step, elapsed seconds). The
    optimizer keeps its implementation (fused or not: _make_optimizer's choice for the device
    the run resumes on). ValueError naming `path` when it is unreadable, incomplete or of
    another model."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated zip, garbage, a pickle of something else
        raise ValueError(f"{path} is not a readable checkpoint ({_one_line(e)})") from None
    missing = [k for k in ("step", "model", "optimizer", "torch_rng") if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        raise ValueError(f"{path} is not a complete checkpoint: no {', '.join(missing)}")
    _check_shapes(ckpt["model"], model, path)
    fused = [g.get("fused") for g in optimizer.param_groups]  # _make_optimizer's, by this device
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, f in zip(optimizer.param_groups, fused):
            group["fused"] = f  # load_state_dict takes the saved groups' settings, fused included
        torch.set_rng_state(ckpt["torch_rng"].cpu())  # map_location moved it to `device`
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} does not fit this run ({_one_line(e)})") from None
    if "cuda_rng" in ckpt and device.type == "cuda":
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["cuda_rng"]])
    return ckpt["step"], ckpt.get("elapsed_s", 0.0)


def _read_curve(path: Path, upto_step: int) -> list[dict]:
    """The metrics.jsonl records with step <= upto_step (a resumed run drops the rest)."""
    if not path.exists():
        return []
    records = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text file ({_one_line(e)})") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rec = json.loads(line)
                step = rec["step"] if isinstance(rec, dict) else None
            except (json.JSONDecodeError, KeyError):
                step = None
            if not isinstance(step, int):
                raise ValueError(f"{path} line {number} is not a metrics record "
                                 f"(fix or delete that line, then --resume again): {line[:60]!r}")
            if step <= upto_step:
                records.append(rec)
    return records


def plot_curves(records: list[dict], path: Path, title: str = "", chance: float | None = None) -> None:
    """PNG of loss (log scale) and accuracy over steps, train (a line per log interval) and
    test (a marker per evaluation), and the task's chance accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, style in (("train", "-"), ("test", "o-")):
        recs = [r for r in records if r.get("split") == split]
        if not recs:
            continue
        steps = [r["step"] for r in recs]
        ax_loss.plot(steps, [r["loss"] for r in recs], style, label=split)
        ax_acc.plot(steps, [r["accuracy"] for r in recs], style, label=split)
    if chance is not None:
        ax_acc.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance {chance:.3g}")
    ax_loss.set(xlabel="step", ylabel="answer loss", yscale="log", title="loss")
    ax_acc.set(xlabel="step", ylabel="answer accuracy", ylim=(-0.02, 1.02), title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------- interrupts

class Interrupted(Exception):
    """Training stopped by Ctrl-C after writing a checkpoint at `step`."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step


@contextmanager
def _sigint_flag():
    """Turn the first Ctrl-C into a flag the loop checks between steps (a second one kills)."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        flag["set"] = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------ training

def _make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, betas (0.9, cfg.beta2); weight decay on matrices only (not on norms, biases or
    gates' vectors), or on every parameter with cfg.decay_all (as torch's AdamW by default).
    Fused (one kernel for every parameter, the step count on the device) when every parameter
    is on CUDA; elsewhere torch's default implementation."""
    params = list(model.parameters())
    decayed = (lambda p: True) if cfg.decay_all else (lambda p: p.dim() >= 2)
    groups = [{"params": [p for p in params if decayed(p)], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if not decayed(p)], "weight_decay": 0.0}]
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, cfg.beta2),
                             eps=1e-8, fused=True if on_cuda else None)


def model_aux_loss(model):
    """The sum of the `aux_loss` tensors the model's modules set in their last forward
    (Mixture-of-Memories' load balancing), or None when no module has one."""
    losses = [m.aux_loss for m in model.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)]
    return sum(losses) if losses else None


def _train_step(model, optimizer, batch: Batch, lr: float, grad_clip: float,
                device: torch.device, dtype: torch.dtype, sp=None, aux_loss_coef: float = 0.0) -> tuple[float, dict]:
    """One optimizer step on `batch` at learning rate `lr`; returns (loss, answer_loss counts).
    sp: the SequenceParallelContext the model runs under, or None. aux_loss_coef: weight of
    model_aux_loss in the loss that is backpropagated (the returned loss excludes it).
    The step is queued whole (_queue_train_step), then its loss and counts are read once:
    the step's one wait for the device, so step times are real."""
    return _queue_train_step(model, optimizer, batch, lr, grad_clip, device, dtype, sp,
                             aux_loss_coef).resolve()


def _queue_train_step(model, optimizer, batch: Batch, lr: float, grad_clip: float,
                      device: torch.device, dtype: torch.dtype, sp=None,
                      aux_loss_coef: float = 0.0) -> AnswerStats:
    """_train_step up to and including optimizer.step(), its loss and counts left on the
    device (AnswerStats). Without sp (and with a model that reads no values on the host)
    nothing here waits for the device: the host queues the backward while the forward runs."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, stats = batch_loss(model, batch, device, dtype, sp)
    aux = model_aux_loss(model) if aux_loss_coef else None
    if aux is not None:
        loss = loss + aux_loss_coef * aux.float()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sp is not None:
        all_reduce_gradients(model, sp)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return stats


# -------------------------------------------------------------------- sequence parallelism

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def sequence_parallel_group(device: torch.device):
    """Joins the process group torchrun describes in the environment (TORCHRUN_ENV), or uses
    the default group when torch.distributed is already initialised; yields
    (SequenceParallelContext over it, this rank's device: cuda:LOCAL_RANK for a device
    "cuda" without an index). A group it created is destroyed on exit.

    ValueError (before any communication) when torchrun's variables are missing."""
    from .parallel import SequenceParallelContext

    created = not (dist.is_available() and dist.is_initialized())
    if created:
        missing = [name for name in TORCHRUN_ENV if name not in os.environ]
        why = f"{', '.join(missing)} not set" if missing else "torch.distributed is unavailable"
        if missing or not dist.is_available():
            raise ValueError("--sequence-parallel runs under torchrun (torchrun --nproc-per-node N "
                             f"-m linattn.cli train ... --sequence-parallel): {why}")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        dist.barrier()  # every rank has passed its checks before rank 0 writes anything
        yield SequenceParallelContext(), device
    finally:
        if created:
            dist.destroy_process_group()


def all_reduce_gradients(model, sp) -> None:
    """Sums every parameter's gradient over sp's group, one all-reduce per gradient dtype
    (under sequence parallelism each rank's gradient is its own tokens' part). A parameter
    without a gradient gets zeros, so every rank sends the same layout."""
    by_dtype = {}
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])  # [sum of numels]
        dist.all_reduce(flat, group=sp.group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def _any_rank(flag: bool, sp, device: torch.device) -> bool:
    """flag on this process, or under sequence parallelism whether any rank raised it (so
    all ranks stop at the same step: one tiny all-reduce)."""
    if sp is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, group=sp.group)
    return bool(t.item() > 0)


def train(model_cfg, task: Task, cfg: TrainConfig, out_dir=None, *, resume: bool = False,
          progress: bool | str = True, on_step=None, sequence_parallel: bool = False) -> dict:
    """Train a CausalLM(model_cfg) on `task`, evaluate it on the test split, return metrics.

    out_dir: where the files listed in the module docstring go (None: write nothing).
    resume: continue from out_dir/checkpoint.pt (ValueError when there is none). cfg.steps
        may be larger than the checkpoint's step, also for a finished run: training goes on to
        cfg.steps, the learning rate following the cfg.steps-step schedule from the
        checkpoint's step on (as if the run had been planned that long; the lr rises again
        when a finished run is extended); fewer steps than the checkpoint's is a ValueError.
    progress: True: a tqdm bar on stderr when it is a terminal, else plain progress lines on
        stderr now and then; "lines": those lines; False: nothing.
    on_step(step, record): called after each completed step (tests use it to interrupt).
    sequence_parallel: train one model replica sequence-parallel over the processes torchrun
        started (see the module docstring; ValueError outside torchrun). Every rank calls
        train with the same arguments and returns the same metrics; rank 0 alone writes out_dir.
    Returns the dict written to metrics.json (also has "model" for in-process callers).
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    if not sequence_parallel:
        return _train(model_cfg, task, cfg, out_dir, resume, progress, on_step, device, None)
    with sequence_parallel_group(device) as (sp, device):
        return _train(model_cfg, task, cfg, out_dir, resume, progress, on_step, device, sp)


def _train(model_cfg, task, cfg, out_dir, resume, progress, on_step, device, sp) -> dict:
    """train()'s loop on `device`, sequence-parallel over sp (a SequenceParallelContext) or not."""
    dtype = resolve_dtype(cfg.dtype, device)
    out = Path(out_dir) if out_dir is not None else None
    lead = sp is None or sp.rank == 0  # the process that writes files and shows progress
    writer = out if lead else None
    if writer is not None:
        writer.mkdir(parents=True, exist_ok=True)
        if not resume:  # a fresh run must never resume, or report, a previous run's files
            for name in (CHECKPOINT_FILE, METRICS_FILE, WEIGHTS_FILE, PLOT_FILE):
                (writer / name).unlink(missing_ok=True)

    if sp is not None and cfg.compile != "none":
        raise ValueError("compile runs on one process: use compile='none' with sequence "
                         "parallelism")
    model = build_model(model_cfg, device, cfg.seed)
    model.set_sequence_parallel(sp)
    model.train()
    optimizer = _make_optimizer(model, cfg)
    run_model = compile_model(model, cfg.compile, device, rows=cfg.batch_size)  # model unless compiling
    if cfg.compile == "reduce-overhead" and device.type == "cuda":
        _warm_outside_graphs(model, [short_task_of(task, cfg), task], cfg, device,
                             resolve_dtype(cfg.dtype, device))
    start_step, elapsed_before = 0, 0.0
    if resume:
        if out is None or not (out / CHECKPOINT_FILE).is_file():
            raise ValueError(f"nothing to resume: no {CHECKPOINT_FILE} in {out_dir}")
        start_step, elapsed_before = _load_checkpoint(out / CHECKPOINT_FILE, model, optimizer, device)
        if start_step > cfg.steps:
            raise ValueError(f"steps={cfg.steps} is fewer than the {start_step} steps "
                             f"{out / CHECKPOINT_FILE} has already trained")
    records = _read_curve(out / CURVE_FILE, start_step) if (out is not None and resume) else []
    if writer is not None:
        write_json(writer / CONFIG_FILE, run_config_dict(model_cfg, task, cfg))
        curve_text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(writer / CURVE_FILE, lambda tmp: Path(tmp).write_text(curve_text))

    n_params = sum(p.numel() for p in model.parameters())
    short_task, short_steps = task.shortest(), round(cfg.seq_len_warmup * cfg.steps)
    bar = _progress_bar(cfg.steps, start_step, progress if lead else False,
                        desc=f"{task.name} {model_name(model_cfg)}")
    window = {"loss": 0.0, "tokens": 0, "correct": 0, "steps": 0}
    timed_tokens, timed_s = 0, 0.0  # throughput excludes the first step of a process (compile)
    t_start = time.perf_counter()
    step, stopped = start_step, "steps"

    def checkpoint():
        if writer is not None:
            _save_checkpoint(writer / CHECKPOINT_FILE, step, model, optimizer,
                             elapsed_before + time.perf_counter() - t_start)

    def log(record):
        records.append(record)
        if writer is not None:
            with open(writer / CURVE_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    with _sigint_flag() as sigint:
        while step < cfg.steps:
            elapsed = elapsed_before + time.perf_counter() - t_start
            if _any_rank(bool(cfg.time_limit_s) and elapsed >= cfg.time_limit_s, sp, device):
                stopped = "time_limit"
                break
            t0 = time.perf_counter()
            lr = cfg.lr_at(step)
            step_task = short_task if step < short_steps else task   # sequence-length warm-up
            tokens_per_step = cfg.batch_size * step_task.seq_len
            batch = step_task.batch("train", cfg.seed, step, cfg.batch_size).to(device)
            loss_value, counts = _train_step(run_model, optimizer, batch, lr, cfg.grad_clip, device,
                                             dtype, sp, aux_loss_coef=cfg.aux_loss_coef)
            dt = time.perf_counter() - t0
            step += 1
            if step > start_step + 1:
                timed_tokens += tokens_per_step
                timed_s += dt

            window["loss"] += loss_value
            window["tokens"] += counts["tokens"]
            window["correct"] += counts["correct"]
            window["steps"] += 1
            tok_s = timed_tokens / timed_s if timed_s > 0 else tokens_per_step / dt
            record = {"step": step, "split": "train", "loss": loss_value,
                      "accuracy": counts["correct"] / counts["tokens"], "lr": lr}
            if step % cfg.log_every == 0 or step == cfg.steps:
                log({"step": step, "split": "train", "loss": window["loss"] / window["steps"],
                     "accuracy": window["correct"] / window["tokens"], "lr": lr,
                     "tokens_per_s": tok_s})
                window = {"loss": 0.0, "tokens": 0, "correct": 0, "steps": 0}
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.steps:
                ev = evaluate(run_model, task, seed=cfg.seed, batches=cfg.eval_batches,
                              batch_size=cfg.batch_size, device=device, dtype=dtype, sp=sp)
                log({"step": step, "split": "test", "loss": ev["loss"], "accuracy": ev["accuracy"],
                     "exact_match": ev["exact_match"]})
                if cfg.stop_at_accuracy and ev["accuracy"] >= cfg.stop_at_accuracy:
                    stopped = "accuracy"
            if step % cfg.ckpt_every == 0:
                checkpoint()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{record['accuracy']:.3f}",
                                tok_s=f"{tok_s:,.0f}")
                bar.step_done(step)
            if on_step is not None:
                on_step(step, record)
            if stopped == "accuracy":
                break
            if _any_rank(sigint["set"], sp, device):
                checkpoint()
                if bar is not None:
                    bar.close()
                raise Interrupted(step)
    if bar is not None:
        bar.close()
    checkpoint()

    ev = evaluate(run_model, task, seed=cfg.seed, batches=cfg.eval_batches,
                  batch_size=cfg.batch_size, device=device, dtype=dtype, sp=sp)
    model.set_sequence_parallel(None)  # the returned model runs on one process
    final = {"step": step, "split": "test", "loss": ev["loss"], "accuracy": ev["accuracy"],
             "exact_match": ev["exact_match"]}
    # the same weights on the same batches were already evaluated at this step (a finished
    # run resumed, or a periodic evaluation at a time-limit stop): one line per evaluation
    if not any(r["split"] == "test" and r["step"] == step for r in records):
        log(final)
    train_recs = [r for r in records if r["split"] == "train"]
    wall = elapsed_before + time.perf_counter() - t_start
    metrics = {
        "accuracy": ev["accuracy"], "exact_match": ev["exact_match"], "loss": ev["loss"],
        "test_sequences": ev["sequences"], "steps": step, "stopped_by": stopped,
        "tokens_per_s": (timed_tokens / timed_s) if timed_s > 0 else None,
        "parameters": n_params, "train_loss": train_recs[-1]["loss"] if train_recs else None,
        "train_accuracy": train_recs[-1]["accuracy"] if train_recs else None,
        "wall_s": wall, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "task": task.name, "mixer": model_name(model_cfg),
        "sequence_parallel": 1 if sp is None else sp.world_size,
    }
    if writer is not None:
        write_json(writer / METRICS_FILE, metrics)
        save_weights(model, writer / WEIGHTS_FILE)
        plot_curves(records, writer / PLOT_FILE, title=f"{task.name} / {_describe(model_cfg)}",
                    chance=task.chance)
    return {**metrics, "model": model}


def format_table(rows: list[dict]) -> str:
    """A plain aligned text table of dicts that share their keys (the first row's order)."""
    cols = list(rows[0])
    width = {c: max(len(str(c)), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}

    def line(values):
        return "  ".join(str(v).ljust(width[c]) for c, v in zip(cols, values)).rstrip()

    return "\n".join([line(cols), line("-" * width[c] for c in cols)]
                     + [line(r.get(c, "") for c in cols) for r in rows])


def model_name(model_cfg) -> str:
    """The model's layers in a few words: the mixer, "gla hybrid 2:1", or an explicit
    pattern as given ("gla,attention,gla")."""
    if model_cfg.layers is not None:
        return ",".join(model_cfg.layers)
    hybrid = f" hybrid {model_cfg.hybrid}:1" if getattr(model_cfg, "hybrid", None) else ""
    return f"{model_cfg.mixer}{hybrid}"


def _describe(model_cfg) -> str:
    return f"{model_name(model_cfg)}, {model_cfg.n_layers} layers, d_model {model_cfg.d_model}"


def _progress_bar(total: int, initial: int, mode, desc: str, every_s: float = 10.0):
    """Progress on stderr. mode True: a tqdm bar when stderr is a terminal, else plain lines;
    "lines": plain lines (a start line, the first step, then one every `every_s` seconds and
    the last step); False: nothing."""
    if not mode:
        return None
    if mode is True and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)
        bar.step_done = lambda step: None
        return bar
    return _LineProgress(total, initial, desc, every_s)


class _LineProgress:
    """tqdm's calls used by the training loop, printed as a plain line now and then."""

    def __init__(self, total: int, initial: int, desc: str, every_s: float):
        self.total, self.desc, self.every_s, self.postfix = total, desc, every_s, {}
        self.t0 = time.perf_counter()
        self.last_print, self.last_step, self.printed_step = None, initial, initial
        self._print(f"{desc}: training steps {initial + 1}..{total}" if initial < total
                    else f"{desc}: already trained {total} steps, evaluating")

    def _print(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def step_done(self, step: int) -> None:
        self.last_step = step
        now = time.perf_counter()
        if self.last_print is None or now - self.last_print >= self.every_s or step == self.total:
            self.last_print, self.printed_step = now, step
            values = "  ".join(f"{k.replace('_', '/')} {v}" for k, v in self.postfix.items())
            self._print(f"{self.desc}: step {step}/{self.total}  {values}  {now - self.t0:.0f} s")

    def close(self) -> None:
        if self.last_step != self.printed_step:
            self.printed_step = self.last_step
            self._print(f"{self.desc}: stopped at step {self.last_step}/{self.total}")


def load_trained(out_dir, device: str | None = None) -> tuple:
    """A finished run's model with its trained weights, in eval mode: (CausalLM, LMConfig,
    Task, TrainConfig, torch.device). device: None for the run's own. ValueError naming the
    file when config.json or model.safetensors is missing, unreadable or of another model."""
    model_cfg, task, cfg = load_run(out_dir)
    weights = Path(out_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{out_dir} has no {WEIGHTS_FILE} (did training finish?)")
    dev = resolve_device(device or cfg.device)
    model = build_model(model_cfg, dev, cfg.seed)
    load_weights(model, weights)
    return model.eval(), model_cfg, task, cfg, dev


def evaluate_run(out_dir, *, seed: int | None = None, batches: int | None = None,
                 batch_size: int | None = None, device: str | None = None) -> dict:
    """Reload a finished run (config.json + model.safetensors) and evaluate it on the test
    split under `seed`. The defaults (the run's seed, eval_batches and batch_size) are the
    batches training's final evaluation used, so they reproduce metrics.json's test numbers;
    the test split never overlaps the training data under any seed, and another seed draws
    other test sequences. Returns evaluate()'s dict plus run facts."""
    for name, value in (("batches", batches), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    model, model_cfg, task, cfg, dev = load_trained(out_dir, device)
    dtype = resolve_dtype(cfg.dtype, dev)
    seed = cfg.seed if seed is None else seed
    res = evaluate(model, task, seed=seed, batches=cfg.eval_batches if batches is None else batches,
                   batch_size=cfg.batch_size if batch_size is None else batch_size, device=dev, dtype=dtype)
    return {**res, "task": task.name, "model": _describe(model_cfg), "seed": seed,
            "parameters": sum(p.numel() for p in model.parameters()), "device": str(dev)}
