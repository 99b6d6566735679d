"""Shared pieces of the speed benchmarks (step_throughput.py, loss_curve.py, e2e_throughput.py).

- `bench_config`: a run config for benchmarking (random init, no Hub downloads, one micro-step per step).
- `synthetic_batches`: loader-shaped CPU batches (fixed shapes, padded captions, 15% MLM, 50% ITM negatives).
- `build_ours`: our training step exactly as `gaudi-pretrain train` runs it (backend seam + DeepSpeed engine +
  `train.loop.train_step`), or a plain-torch variant without DeepSpeed.
- `build_hf`: transformers' BridgeTower doing the recipe-faithful step (two full forwards per step).
- `time_steps`, `matmul_peak_tflops`, `phase_breakdown`: the measurements.

Benchmarks may call `torch.cuda` directly (they are not the package; the backend seam rule is for
`gaudi_pretrain/`). Nothing here downloads anything.
"""

from __future__ import annotations

import gc
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gaudi_pretrain.config import RunConfig, load_config  # noqa: E402

SPECIAL_IDS = (0, 1, 2, 3, 4)  # <s> <pad> </s> <unk> <mask>: RoBERTa's order, as the demo tokenizer
BOS, PAD, EOS, MASK = 0, 1, 2, 4


# ------------------------------------------------------------------------------------------ config


def bench_config(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    device: str = "auto",
    micro_batch: int | None = None,
    compile: bool | None = None,
) -> RunConfig:
    """`path` + overrides, made runnable offline: random init (no CLIP/RoBERTa/BridgeTower download), one
    micro-step per optimizer step, no global-batch check, `backend.name=device`."""
    fixed = [
        "model.from_pretrained=null",
        "model.init_vision_from=null",
        "model.init_text_from=null",
        "train.gradient_accumulation_steps=1",
        "train.global_batch_size=null",
        f"backend.name={device}",
    ]
    if micro_batch is not None:
        fixed.append(f"train.micro_batch_size={micro_batch}")
    if compile is not None:
        fixed.append(f"backend.compile={str(compile).lower()}")
    return load_config(path, fixed + list(overrides or []))


def config_with(cfg: RunConfig, **changes: Any) -> RunConfig:
    """A copy of `cfg` with dotted-path changes, e.g. config_with(cfg, **{"train.micro_batch_size": 32})."""
    raw = cfg.model_dump(mode="json")
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return RunConfig.model_validate(raw)


# ------------------------------------------------------------------------------------------- device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def device_slug(device: torch.device, config_path: str | Path) -> str:
    """File stem for results: 'nvidia-h100-80gb-hbm3' for the large config, '<device>-<config>' otherwise."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or device.type
    stem = Path(config_path).stem
    return slug if stem == "bridgetower_large" else f"{slug}-{re.sub(r'[^a-z0-9]+', '-', stem.lower())}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Device allocator peak since the last reset (CUDA); process peak RSS on CPU (never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    from gaudi_pretrain.backends.base import peak_rss_bytes

    return peak_rss_bytes() / 2**30


def free_memory(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks between measured configurations."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "deepspeed"):
        try:
            out[name] = metadata.version(name)  # no import: transformers takes seconds to import
        except metadata.PackageNotFoundError:
            out[name] = None
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def write_result(out_dir: str | Path, stem: str, result: dict[str, Any], markdown: str) -> None:
    """`<out_dir>/<stem>.json` + `.md`, and the markdown on stdout."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ------------------------------------------------------------------------------------------ batches


def synthetic_batch(
    cfg: RunConfig, batch_size: int, rng: np.random.Generator, vocab_limit: int | None = None
) -> dict[str, Any]:
    """One loader-shaped batch on the CPU (the contract of `data.pipeline`): float32 pixels [B, 3, S, S],
    captions `<s> … </s> <pad>…` of 8..L tokens, 15% MLM targets (80/10/10), 50% ITM negatives.

    Token ids follow a Zipf law over the first `vocab_limit` ids, so the MLM loss has something to learn
    (loss_curve.py); `keys` and `skipped` are there because `train.loop.train_step` consumes them."""
    from gaudi_pretrain.data.masking import itm_negatives, mask_tokens
    from gaudi_pretrain.data.pipeline import assemble_batch

    length, size = cfg.data.max_text_len, cfg.model.vision.image_size
    vocab = min(vocab_limit or cfg.model.text.vocab_size, cfg.model.text.vocab_size)
    normal_ids = np.arange(len(SPECIAL_IDS), vocab)
    zipf = 1.0 / np.arange(1, len(normal_ids) + 1)
    ids = np.full((batch_size, length), PAD, dtype=np.int64)
    lengths = rng.integers(min(8, length), length + 1, size=batch_size)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = BOS, EOS
        ids[i, 1 : n - 1] = rng.choice(normal_ids, size=n - 2, p=zipf / zipf.sum())
    attention = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    valid = np.ones(batch_size, dtype=bool)
    mlm_ids, mlm_labels = mask_tokens(
        ids,
        special_ids=SPECIAL_IDS,
        mask_id=MASK,
        random_ids=normal_ids,
        probability=cfg.data.mlm_probability,
        rng=rng,
        valid=valid,
    )
    captions = [" ".join(map(str, row[:n])) for row, n in zip(ids, lengths)]
    itm_index, itm_labels = itm_negatives(valid, captions, negative_prob=cfg.data.itm_negative_prob, rng=rng)
    pixels = torch.from_numpy(rng.standard_normal((batch_size, 3, size, size), dtype=np.float32))
    keys = [f"synthetic-{i}" for i in range(batch_size)]
    batch = assemble_batch(pixels, ids, attention, mlm_ids, mlm_labels, itm_index, itm_labels, valid, keys)
    batch["skipped"] = 0
    return batch


def synthetic_batches(
    cfg: RunConfig, batch_size: int, seed: int = 0, pool: int = 4, vocab_limit: int | None = 1000
) -> Iterator[dict[str, Any]]:
    """An endless stream cycling over `pool` distinct CPU batches (shallow copies: consumers pop keys)."""
    rng = np.random.default_rng(seed)
    batches = [synthetic_batch(cfg, batch_size, rng, vocab_limit) for _ in range(pool)]
    while True:
        for b in batches:
            yield dict(b)


def fixed_batches(
    cfg: RunConfig, batch_size: int, count: int, seed: int = 0, vocab_limit: int | None = 1000
) -> list[dict[str, Any]]:
    """`count` distinct batches (the loss-curve comparison feeds the same list to both runs)."""
    rng = np.random.default_rng(seed)
    return [synthetic_batch(cfg, batch_size, rng, vocab_limit) for _ in range(count)]


# -------------------------------------------------------------------------------------- our step


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile each transformer block on its own (vision resblocks, text layers, cross layers):
    identical blocks share one compiled graph, so compilation is much shorter than for the whole model."""
    from gaudi_pretrain.model.bridgetower import CrossLayer, ResidualAttentionBlock, TextLayer

    n = 0
    for module in model.modules():
        if isinstance(module, (ResidualAttentionBlock, TextLayer, CrossLayer)):
            module.compile()
            n += 1
    return n


# --------------------------------------------------------------- levers tried from outside the model
# Variants of the model's math that the benchmark can time without touching gaudi_pretrain: if one pays,
# it moves into the model; if not, it stays here as the measured counterfactual.


def two_pass_vision_forward(self, batch):
    """BridgeTowerForPretraining.forward WITHOUT the shared vision pass: the vision tower runs on the true
    images and again on the ITM images (2B images, as the recipe's two forwards do). Same losses."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    bt = self.bridgetower
    px = batch["pixel_values"]
    paired = bt.encode_images(torch.cat([px, px.index_select(0, batch["itm_image_index"])]))
    mask2 = torch.cat([mask, mask])
    text = bt.encode_text(torch.cat([batch["mlm_input_ids"], ids]), mask2)
    text_f, image_f = bt.cross_encode(text, mask2, paired)
    return self.heads(text_f, image_f, batch)


def fused_qkv_forward(self, x, context, key_mask):
    """QKV.forward with one projection matmul for q/k/v (self-attention) or k/v (cross-attention): the
    weights are concatenated on the fly (a few MB per layer), the math is the same."""
    from gaudi_pretrain.model.attention import _merge_heads, _split_heads, additive_mask

    q_, k_, v_ = self.query, self.key, self.value
    if context is x:
        w = torch.cat([q_.weight, k_.weight, v_.weight])
        bias = torch.cat([q_.bias, k_.bias, v_.bias])
        q, k, v = torch.nn.functional.linear(x, w, bias).chunk(3, dim=-1)
    else:
        q = q_(x)
        w, bias = torch.cat([k_.weight, v_.weight]), torch.cat([k_.bias, v_.bias])
        k, v = torch.nn.functional.linear(context, w, bias).chunk(2, dim=-1)
    q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))
    mask = additive_mask(key_mask, q.dtype) if key_mask is not None else None
    p = self.dropout if self.training else 0.0
    return _merge_heads(self.attend(q, k, v, mask, p))


class ModelPatches:
    """Context manager applying lever patches for one measurement: `vision="twice"` (per model instance,
    see `apply`), `qkv="fused"` (class-level QKV.forward while the context is open)."""

    def __init__(self, vision: str = "shared", qkv: str = "separate"):
        if vision not in ("shared", "twice") or qkv not in ("separate", "fused"):
            raise ValueError(f"vision must be shared|twice, qkv separate|fused (got {vision!r}, {qkv!r})")
        self.vision, self.qkv = vision, qkv
        self._saved = None

    def apply(self, model: torch.nn.Module) -> None:
        if self.vision == "twice":
            import types

            model.forward = types.MethodType(two_pass_vision_forward, model)

    def __enter__(self):
        if self.qkv == "fused":
            from gaudi_pretrain.model.attention import QKV

            self._saved = QKV.forward
            QKV.forward = fused_qkv_forward
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            from gaudi_pretrain.model.attention import QKV

            QKV.forward = self._saved
            self._saved = None
        return False


@dataclass
class OursStep:
    """Our training step, built; `step()` runs one optimizer step on the next batch."""

    cfg: RunConfig
    backend: Any
    engine_kind: str  # "deepspeed" (as `gaudi-pretrain train`) or "torch" (no DeepSpeed)
    model: torch.nn.Module  # the eager module (compiled wrappers removed): for the instrumented pass
    step: Callable[[], Any]
    backward: Callable[[torch.Tensor], None]
    optimizer_step: Callable[[], None]
    float_dtype: torch.dtype
    batches: Iterator[dict[str, Any]]
    last_losses: Callable[[], dict[str, float]]
    keep: list[Any] = field(default_factory=list)  # engine / optimizer references, dropped by close()

    def close(self) -> None:
        for obj in self.keep:
            destroy = getattr(obj, "destroy", None)
            if callable(destroy):
                try:
                    destroy()
                except Exception:  # noqa: BLE001 - best effort before freeing memory
                    pass
        self.keep.clear()
        self.model = None  # type: ignore[assignment]
        self.step = self.backward = self.optimizer_step = None  # type: ignore[assignment]


def build_model_on_device(cfg: RunConfig, backend: Any, init_state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    from gaudi_pretrain.model.factory import build_model

    backend.set_seed(cfg.train.seed)
    # Initialise on the device when it is an accelerator (a 0.9B-parameter init takes seconds on CPU).
    ctx = torch.device(backend.device) if backend.device.type == "cuda" else _nullcontext()
    with ctx:
        model = build_model(cfg.model, backend.attention_fn())
    if init_state is not None:
        model.load_state_dict(init_state)
    return model.to(backend.device)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _compile(model: torch.nn.Module, backend: Any, mode: str) -> torch.nn.Module:
    """mode: "none", "whole" (backend.compile, i.e. torch.compile of the model), "blocks" (per block),
    "cudagraphs" (torch.compile mode=reduce-overhead)."""
    if mode == "whole":
        return torch.compile(model)
    if mode == "blocks":
        compile_blocks(model)
    elif mode == "cudagraphs":
        return torch.compile(model, mode="reduce-overhead")
    return model


def build_ours(
    cfg: RunConfig,
    backend: Any,
    *,
    engine: str = "deepspeed",
    compile_mode: str | None = None,
    seed: int = 0,
    batches: Iterator[dict[str, Any]] | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
    run_dir: str | None = None,
    patches: ModelPatches | None = None,
    optimizer_impl: str = "backend",
) -> OursStep:
    """Our step on synthetic batches. compile_mode None = what the config says (backend.compile → whole).

    engine="deepspeed": the objects `train.setup` builds (`build_engine`, `make_context`: backend optimizer,
    lr schedule, DeepSpeed engine with the derived config: bf16 params + fp32 master weights in ZeRO) and
    each step is `train.loop.train_step` itself: H2D copy, autocast forward, engine backward/step, the
    finiteness check (one host sync), the metric accumulation.
    engine="torch": fp32 parameters + autocast + the backend's fused AdamW + clipping, no DeepSpeed (the
    same settings as the transformers reference). `patches.apply` changes the model's math (see ModelPatches).
    With gradient accumulation > 1 (deepspeed only) one step is that many micro-batches.
    optimizer_impl: "backend" (the backend's: fused AdamW on CUDA), "foreach" or "forloop" (torch AdamW
    without fusion, to measure what the fused kernel buys)."""
    from gaudi_pretrain.train.optim import make_scheduler, param_groups

    mode = compile_mode or ("whole" if cfg.backend.compile else "none")
    batches = batches if batches is not None else synthetic_batches(cfg, cfg.train.micro_batch_size, seed)
    model = build_model_on_device(cfg, backend, init_state)
    if patches is not None:
        patches.apply(model)
    eager = model
    model = _compile(model, backend, mode)
    if optimizer_impl == "backend":
        optimizer = backend.make_optimizer(param_groups(model, cfg.optim), cfg.optim)
    elif optimizer_impl in ("foreach", "forloop"):
        from gaudi_pretrain.backends.base import optimizer_kwargs

        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.optim),
            foreach=optimizer_impl == "foreach",
            fused=False,
            **optimizer_kwargs(cfg.optim),
        )
    else:
        raise ValueError(f"unknown optimizer_impl {optimizer_impl!r} (backend, foreach or forloop)")

    if engine == "deepspeed":
        from gaudi_pretrain.distributed import discover, init_distributed
        from gaudi_pretrain.train.loop import train_step
        from gaudi_pretrain.train.metrics import StepAccumulator, Throughput
        from gaudi_pretrain.train.setup import build_engine, make_context

        info = discover()
        init_distributed(info, backend.dist_backend)
        ds_engine, optimizer = build_engine(cfg, backend, info, model, optimizer)
        ctx = make_context(
            cfg,
            backend,
            info,
            ds_engine,
            optimizer,
            loader=None,
            run_dir=Path(run_dir or tempfile.mkdtemp(prefix="bench_run_")),
            tokenizer=None,
        )
        acc, timer = StepAccumulator(backend.device), Throughput()
        ds_engine.train()

        def step() -> Any:
            return train_step(ctx, batches, acc, timer)

        def last_losses() -> dict[str, float]:
            return acc.reduce()  # means since the last call (one host sync)

        return OursStep(
            cfg,
            backend,
            engine,
            eager,
            step,
            ds_engine.backward,
            ds_engine.step,
            ctx.float_dtype,
            batches,
            last_losses,
            keep=[ds_engine, optimizer],
        )

    if engine != "torch":
        raise ValueError(f"unknown engine {engine!r} (deepspeed or torch)")
    if cfg.train.gradient_accumulation_steps != 1:
        raise ValueError("engine=torch runs one micro-batch per step: use gradient accumulation with deepspeed")
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    clip = cfg.train.grad_clip
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    last: dict[str, torch.Tensor] = {}

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        backend.after_backward()

    def optimizer_step() -> None:
        if clip > 0:
            backend.clip_grad_norm(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        backend.after_optimizer_step()

    def step() -> Any:
        batch = backend.to_device(next(batches))
        with backend.autocast():
            out = model(batch)
        backward(out.loss)
        optimizer_step()
        last.update(loss=out.loss.detach(), mlm_loss=out.mlm_loss.detach(), itm_loss=out.itm_loss.detach())
        return out.loss

    def last_losses() -> dict[str, float]:
        return {k: float(v) for k, v in last.items()}

    return OursStep(
        cfg,
        backend,
        engine,
        eager,
        step,
        backward,
        optimizer_step,
        torch.float32,
        batches,
        last_losses,
        keep=[optimizer, scheduler, model],
    )


# ---------------------------------------------------------------------------------- the reference


@dataclass
class HFStep:
    step: Callable[[], Any]
    params: int
    keep: list[Any] = field(default_factory=list)

    def close(self) -> None:
        self.keep.clear()
        self.step = None  # type: ignore[assignment]


def build_hf(cfg: RunConfig, backend: Any, seed: int = 0, batches: Iterator[dict[str, Any]] | None = None) -> HFStep:
    """transformers' recipe-faithful step: BridgeTowerForMaskedLM on (masked text, true image) and
    BridgeTowerForImageAndTextRetrieval on (clean text, image of `itm_image_index`) — two full forwards,
    one shared BridgeTowerModel — loss = MLM + ITM, autocast (bf16 when the run is bf16), fused AdamW
    (on CUDA) over fp32 parameters, as measured in the issue."""
    from transformers import BridgeTowerForImageAndTextRetrieval, BridgeTowerForMaskedLM

    from gaudi_pretrain.backends.base import optimizer_kwargs
    from gaudi_pretrain.model.hf_convert import to_hf_config

    device = backend.device
    backend.set_seed(cfg.train.seed)
    hf_cfg = to_hf_config(cfg.model)
    ctx = torch.device(device) if device.type == "cuda" else _nullcontext()
    with ctx:
        mlm = BridgeTowerForMaskedLM(hf_cfg)
        itm = BridgeTowerForImageAndTextRetrieval(hf_cfg)
    itm.bridgetower = mlm.bridgetower  # one backbone, two heads (as the original's single model)
    mlm.to(device).train()
    itm.to(device).train()
    gc.collect()
    params = list(mlm.parameters()) + list(itm.itm_score.parameters())
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(params, **optimizer_kwargs(cfg.optim), **fused)
    batches = batches if batches is not None else synthetic_batches(cfg, cfg.train.micro_batch_size, seed)

    def step() -> Any:
        b = backend.to_device(next(batches))
        with backend.autocast():
            mlm_loss = mlm(
                input_ids=b["mlm_input_ids"],
                attention_mask=b["attention_mask"],
                pixel_values=b["pixel_values"],
                labels=b["mlm_labels"],
            ).loss
            itm_loss = itm(
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                pixel_values=b["pixel_values"][b["itm_image_index"]],
                labels=b["itm_labels"],
            ).loss
            loss = mlm_loss + itm_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return HFStep(step, sum(p.numel() for p in params), keep=[mlm, itm, optimizer])


# ---------------------------------------------------------------------------------- measurements


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Run `warmup` untimed steps, then `steps` timed ones (wall clock, device synchronised after each:
    the training loop syncs once per step as well). Returns per-step seconds and the median."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {
        "warmup_s": round(warmup_s, 2),
        "step_s": [round(t, 5) for t in times],
        "median_step_s": statistics.median(times),
    }


def matmul_peak_tflops(
    device: torch.device, dtype: torch.dtype | None = None, n: int | None = None, reps: int = 10
) -> dict[str, Any]:
    """Dense matmul rate of this device in this run: median over `reps` groups of 5 products of random n×n
    matrices (bf16 n=8192 on CUDA; fp32 n=1024 on CPU, where it is only a scale for the smoke numbers)."""
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n = n or (8192 if cuda else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    group = 5 if cuda else 1
    for _ in range(3):
        a @ b
    synchronize(device)
    rates = []
    for _ in range(reps if cuda else 3):
        t0 = time.perf_counter()
        for _ in range(group):
            a @ b
        synchronize(device)
        rates.append(2 * n**3 * group / (time.perf_counter() - t0) / 1e12)
    del a, b
    return {
        "tflops": statistics.median(rates),
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "all_tflops": [round(r, 1) for r in rates],
    }


class Clock:
    """Ordered time marks on the device stream (CUDA events) or the host clock (CPU, synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[tuple[str, Any]] = []

    def mark(self, label: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((label, event))
        else:
            self.marks.append((label, time.perf_counter()))

    def intervals(self) -> list[tuple[str, float]]:
        """[(label, ms)]: the time from the previous mark to each mark, consecutive equal labels merged
        (the last of a run of marks ends that phase)."""
        synchronize(self.device)
        merged: list[tuple[str, Any]] = []
        for label, t in self.marks:
            if merged and merged[-1][0] == label:
                merged[-1] = (label, t)
            else:
                merged.append((label, t))
        out = []
        for (_, t0), (label, t1) in zip(merged, merged[1:]):
            ms = t0.elapsed_time(t1) if self.cuda else (t1 - t0) * 1e3
            out.append((label, ms))
        return out


FORWARD_PHASES = ("vision", "text", "cross", "heads")


def _head_rows(batch: dict[str, Any], rows: int) -> dict[str, Any]:
    """The first `rows` rows of a batch (ITM image indices folded into range)."""
    out = {k: v[:rows] for k, v in batch.items()}
    out["itm_image_index"] = out["itm_image_index"] % rows
    return out


def phase_breakdown(ours: OursStep, repeats: int = 3) -> dict[str, Any]:
    """`_phase_breakdown` on the full micro batch; if the eager pass runs out of memory (it keeps more
    activations than a compiled step), on half of it. Never raises: an error is returned in the dict."""
    device = ours.backend.device
    rows = ours.cfg.train.micro_batch_size
    while True:
        try:
            result = _phase_breakdown(ours, repeats, rows)
            result["rows"] = rows
            return result
        except Exception as exc:  # noqa: BLE001 - the timed result must survive a failed breakdown
            oom = is_oom(exc)
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        free_memory(device)
        if not oom or rows <= 2:
            return {"error": message, "rows": rows}
        rows //= 2


def _phase_breakdown(ours: OursStep, repeats: int, rows: int) -> dict[str, Any]:
    """Per-phase time of our step in an instrumented eager pass (after the timed steps).

    Forward: time marks after `encode_images` (vision), `encode_text` (text; includes the ITM image gather),
    `cross_encode` (cross-modal, both passes) and the model's return (heads + losses).
    Backward: autograd hooks mark when the gradient of each phase's input is complete: cross-modal
    outputs (heads done), cross-modal inputs (cross done), text embeddings output (text tower done),
    vision ln_pre output (vision tower done); `engine` is the rest of backward (embedding and patch
    weight gradients, DeepSpeed's gradient epilogue). Autograd runs later-created nodes first, so the
    text tower's backward precedes the vision tower's; an interleaving would blur the split, not the total.
    Optimizer: DeepSpeed's `engine.step()` (ZeRO optimizer, clipping, lr schedule) or torch's step.
    The pass is eager even when the timed step is compiled: its shares, not its sum, are the point."""
    model = ours.model
    bt = model.bridgetower
    device = ours.backend.device
    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        clock = Clock(device)
        handles = []

        def hook_outputs(outputs: Any, label: str, clock: Clock = clock) -> None:
            for t in outputs if isinstance(outputs, (tuple, list)) else (outputs,):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda grad, label=label: clock.mark(label))

        def wrap(name: str, fwd_label: str, bwd_label: str, clock: Clock = clock):
            original = getattr(type(bt), name).__get__(bt)

            def timed(*args, **kwargs):
                out = original(*args, **kwargs)
                clock.mark(fwd_label)
                hook_outputs(out, bwd_label)
                return out

            return timed

        bt.encode_images = wrap("encode_images", "fwd:vision", "bwd:cross")
        bt.encode_text = wrap("encode_text", "fwd:text", "bwd:cross")
        bt.cross_encode = wrap("cross_encode", "fwd:cross", "bwd:heads")
        handles.append(bt.text_model.embeddings.register_forward_hook(lambda m, i, o: hook_outputs(o, "bwd:text")))
        handles.append(
            bt.vision_model.visual.ln_pre.register_forward_hook(lambda m, i, o: hook_outputs(o, "bwd:vision"))
        )
        try:
            batch = _head_rows(ours.backend.to_device(next(ours.batches), ours.float_dtype), rows)
            clock.mark("start")
            with ours.backend.autocast():
                out = model(batch)
            clock.mark("fwd:heads")
            ours.backward(out.loss)
            clock.mark("bwd:engine")
            ours.optimizer_step()
            clock.mark("optimizer")
        finally:
            for name in ("encode_images", "encode_text", "cross_encode"):
                bt.__dict__.pop(name, None)
            for h in handles:
                h.remove()
        run: dict[str, float] = {}
        for label, ms in clock.intervals():
            run[label] = run.get(label, 0.0) + ms
        runs.append(run)
    labels = sorted({k for r in runs for k in r})
    median = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in labels}
    total = sum(median.values())
    phases = {p: median.get(f"fwd:{p}", 0.0) + median.get(f"bwd:{p}", 0.0) for p in FORWARD_PHASES}
    phases["engine_backward_rest"] = median.get("bwd:engine", 0.0)
    phases["optimizer"] = median.get("optimizer", 0.0)
    return {
        "ms": {k: round(v, 3) for k, v in median.items()},
        "phase_ms": {k: round(v, 3) for k, v in phases.items()},
        "phase_share": {k: round(v / total, 4) if total else None for k, v in phases.items()},
        "total_ms": round(total, 3),
        "repeats": repeats,
        "note": "instrumented eager pass (compiled regions, if any, run eager here); shares, not the sum, "
        "describe the timed step",
    }


def flop_shares(cfg: RunConfig) -> dict[str, float]:
    """Each phase's share of `flops_per_sample` (fwd+bwd), from model/flops.py's analytic counts."""
    from gaudi_pretrain.model import flops as f

    length = cfg.data.max_text_len
    m = cfg.model
    heads = sum(f.head_flops(m, length).values())
    parts = {
        "vision": 3 * f.vision_flops(m) - f.patch_embed_flops(m),
        "text": 3 * 2 * f.text_flops(m, length),
        "cross": 3 * 2 * f.cross_flops(m, length),
        "heads": 3 * heads,
    }
    total = sum(parts.values())
    return {k: round(v / total, 4) for k, v in parts.items()}


def hf_flops_per_sample(cfg: RunConfig) -> int:
    """fwd+bwd matmul FLOPs of the transformers reference step per sample: two full BridgeTowerModel
    passes (each with its poolers), the MLM head on one and the ITM head on the other."""
    from gaudi_pretrain.model import flops as f

    m, length = cfg.model, cfg.data.max_text_len
    heads = f.head_flops(m, length)
    backbone = f.vision_flops(m) + f.text_flops(m, length) + f.cross_flops(m, length) + heads["pool"]
    fwd = 2 * backbone + heads["mlm"] + heads["itm"]
    return 3 * fwd - 2 * f.patch_embed_flops(m)
