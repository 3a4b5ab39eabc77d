"""The measurements of bench/gpu_check.py: the model as a worker builds it, packed-vs-unpacked
equivalence, and training steps timed with their peak memory beside ``raysft plan``'s estimate.

torch and raysft are imported inside the functions, so gpu_check.py can put the vendored wheels and
the checkout on ``sys.path`` first. Every function takes the setup dict ``s`` of ``gpu_check.build_setup``.
"""

from __future__ import annotations

import math
import os
import time

CONTROL_POWER = 3.0  # the contaminated control must miss the tolerance by this factor


def log(msg: str) -> None:
    print(msg, flush=True)


class Clock:
    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()


# ----------------------------------------------------------------------------- the model


def sync(torch, device) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_net(s, *, attn: str, liger: bool):
    """The model as a worker builds it (resolve_accel, build_model), with TRL's fused head on CUDA
    and the recipe's gradient checkpointing; (net, accel)."""
    import dataclasses

    import torch

    from raysft.train import loss, model as models

    mcfg = dataclasses.replace(s["cfg"].model, attn_implementation=attn, use_liger_kernel=liger)
    accel = models.resolve_accel(mcfg, bf16=s["cfg"].trainer.bf16, cuda=s["cuda"])
    device = "cuda" if s["cuda"] else "cpu"
    with torch.device(device):
        net = models.build_model(mcfg, accel, seed=s["cfg"].trainer.seed)
    net.to(device)
    if s["cuda"]:
        loss.add_fused_lm_head(net)  # as SFTTrainer.__init__ does on the workers
    t = s["cfg"].trainer
    if t.gradient_checkpointing:  # as the HF Trainer enables it
        kw = {"use_reentrant": t.use_reentrant}
        if hasattr(net, "activation_checkpointing_enable"):
            net.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    net.train()
    return net, accel


def make_row(lens, vocab: int, device: str, seed: int, *, restart: bool = True) -> dict:
    """One packed row of random sequences: labels = ids except each sequence's first token (never
    predicted from the sequence before), ``position_ids`` restarting per sequence (or one running
    count with ``restart=False``: the contaminated control)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, sum(lens)), generator=g)
    labels = ids.clone()
    starts = [sum(lens[:i]) for i in range(len(lens))]
    labels[0, starts] = -100
    pos = torch.cat([torch.arange(n) for n in lens]) if restart else torch.arange(sum(lens))
    return {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": pos[None].to(device)}


def _autocast(s):
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if s["cuda"] else contextlib.nullcontext()


# ----------------------------------------------------------------------------- 1. equivalence


def _grads(net):
    return [p.grad.detach().float().clone() for p in net.parameters() if p.grad is not None]


def _rel_l2(net, ref) -> float:
    num = den = 0.0
    for p, r in zip((p for p in net.parameters() if p.grad is not None), ref):
        num += float((p.grad.float() - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return math.sqrt(num / den) if den else float("inf")


def equivalence(s, net, *, attn: str, liger: bool) -> dict:
    """Packed row vs the same sequences one by one (the workers' loss path, gradient-accumulated
    with ``num_items_in_batch`` = all their tokens), and the contaminated control."""
    from raysft.train.loss import token_loss

    lens, seed, dev = s["eq_lens"], s["cfg"].trainer.seed, "cuda" if s["cuda"] else "cpu"
    vocab = s["shape"].vocab
    n_items = sum(n - 1 for n in lens)
    packed = make_row(lens, vocab, dev, seed)
    net.zero_grad(set_to_none=True)
    alone, total = [], 0.0
    for i, n in enumerate(lens):  # the same tokens, one sequence per row
        st = sum(lens[:i])
        row = {k: v[:, st:st + n] for k, v in packed.items()}
        row["position_ids"] = row["position_ids"] - row["position_ids"][:, :1]
        with _autocast(s):
            tl = token_loss(net, row, n_items, fused=s["cuda"])
        tl.loss.backward()
        total += tl.loss.item()
        alone.append(tl.nll[0, :n - 1].detach().float())
    ref = _grads(net)

    def compare(row) -> dict:
        net.zero_grad(set_to_none=True)
        with _autocast(s):
            tl = token_loss(net, row, n_items, fused=s["cuda"])
        tl.loss.backward()
        seq_rel, tok = 0.0, 0.0
        for i, n in enumerate(lens):
            st = sum(lens[:i])
            got = tl.nll[0, st:st + n - 1].detach().float()
            seq_rel = max(seq_rel, abs(float(got.sum() - alone[i].sum())) / float(alone[i].sum()))
            tok = max(tok, float((got - alone[i]).abs().max()))
        return {"loss": tl.loss.item(), "loss_alone": total, "seq_loss_rel": seq_rel, "token_nll_max_abs": tok,
                "grad_rel_l2": _rel_l2(net, ref)}

    out = {"attn": attn, "liger": liger, "loss_path": "fused" if s["cuda"] else "plain", "seq_lens": list(lens),
           **compare(packed), "control": compare(make_row(lens, vocab, dev, seed, restart=False))}
    ref.clear()  # the fp32 copies of every gradient
    net.zero_grad(set_to_none=True)
    tol, c = s["tolerance"], out["control"]
    out["within_tolerance"] = out["seq_loss_rel"] <= tol["seq_loss_rel"] and out["grad_rel_l2"] <= tol["grad_rel_l2"]
    out["control_detected"] = (c["seq_loss_rel"] > CONTROL_POWER * tol["seq_loss_rel"]
                               or c["grad_rel_l2"] > CONTROL_POWER * tol["grad_rel_l2"])
    out["ok"] = out["within_tolerance"] and out["control_detected"]
    return out


def loss_paths(s, net) -> dict:
    """The fused loss (GPU workers) vs plain logits (CPU workers) on the same packed row."""
    from raysft.train import loss

    if not s["cuda"]:
        loss.add_fused_lm_head(net)  # without fused_lm_head=True the patched forward is the plain one
    row = make_row(s["eq_lens"], s["shape"].vocab, "cuda" if s["cuda"] else "cpu", s["cfg"].trainer.seed)
    res = {}
    for name, fn in (("plain", loss.plain_token_loss), ("fused", loss.fused_token_loss)):
        net.zero_grad(set_to_none=True)
        with _autocast(s):
            tl = fn(net, row)
        tl.loss.backward()
        res[name] = (tl.loss.item(), tl.nll.detach().float(), _grads(net) if name == "plain" else None)
    rel = _rel_l2(net, res["plain"][2])
    net.zero_grad(set_to_none=True)
    tol = s["tolerance"]
    loss_rel = abs(res["fused"][0] - res["plain"][0]) / res["plain"][0]
    return {"plain_loss": res["plain"][0], "fused_loss": res["fused"][0], "loss_rel": loss_rel,
            "token_nll_max_abs": float((res["fused"][1] - res["plain"][1]).abs().max()), "grad_rel_l2": rel,
            "ok": loss_rel <= tol["seq_loss_rel"] and rel <= tol["grad_rel_l2"]}


# ----------------------------------------------------------------------------- 2 + 3. throughput, memory


class RssPeak:
    """CPU memory of one step: the peak resident set size (sampled every 2 ms) over the RSS before it,
    after ``malloc_trim`` returns freed heap to the OS."""

    def __enter__(self):
        import ctypes
        import threading

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = _rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss())

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def perf_pass(s, net, clock: Clock, *, liger: bool, attn: str, budget_s: float, rate: dict, args) -> tuple[list, list]:
    """Training steps at each length (ascending); a length whose predicted time does not fit in
    ``budget_s`` is skipped, with every longer one. ``rate`` carries seconds per FLOP between passes."""
    import torch

    from raysft.commands import estimates as est
    from raysft.train.loss import token_loss

    t, shape, cuda = s["cfg"].trainer, s["shape"], s["cuda"]
    gc = t.gradient_checkpointing
    opt = torch.optim.AdamW(net.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay, fused=cuda)
    start = clock.elapsed()
    results, skipped = [], []

    def step(row):
        with _autocast(s):
            tl = token_loss(net, row, None, fused=cuda)
        tl.loss.backward()
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=False)  # grads stay allocated, as the estimate counts them
        return tl.loss.detach()

    for L in s["lengths"]:
        fpt = est.flops_per_token(shape, mean_seq_len=L, gradient_checkpointing=gc)
        n_steps = args.warmup + args.steps
        left = budget_s - (clock.elapsed() - start)
        pred = n_steps * rate.get("s_per_flop", 0) * L * fpt * 1.2 + 2
        if skipped or ("s_per_flop" in rate and pred > left):
            skipped.append({"max_length": L, "liger": liger, "reason": "a shorter length was skipped" if skipped else
                            f"time budget: predicted {pred:.0f} s for {n_steps} steps, {max(left, 0):.0f} s left "
                            f"in this pass (longest lengths skipped first)"})
            continue
        t0 = time.perf_counter()
        row = make_row([L], shape.vocab, "cuda" if cuda else "cpu", t.seed + L)
        oom = None
        try:
            for _ in range(args.warmup):
                step(row)
            sync(torch, "cuda" if cuda else "cpu")
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                states = torch.cuda.memory_allocated()
            else:
                states = _state_bytes(net, opt)
            acts, times, losses = 0, [], []
            for _ in range(args.steps):
                t1 = time.perf_counter()
                if cuda:
                    losses.append(float(step(row)))
                    torch.cuda.synchronize()
                else:
                    with RssPeak() as rss:
                        losses.append(float(step(row)))
                    acts = max(acts, rss.peak - rss.base)
                times.append(time.perf_counter() - t1)
        except torch.cuda.OutOfMemoryError as e:
            oom = f"out of memory: {str(e).splitlines()[0][:160]}"
        if oom:  # outside the except block, so the failed step's tensors are free
            del row
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            skipped.append({"max_length": L, "liger": liger, "reason": oom})
            log(f"  max_length {L:>6,} liger {'on ' if liger else 'off'}: {oom}")
            continue
        step_s = sorted(times)[len(times) // 2]
        rate["s_per_flop"] = step_s / (L * fpt)
        tps = L / step_s
        tflops = tps * fpt / 1e12
        mem = {"states": states}
        if cuda:
            mem |= {"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}
        else:
            mem |= {"activations": acts}
        results.append({"max_length": L, "liger": liger, "attn": attn, "mean_seq_len": L, "batch": 1,
                        "steps": args.steps, "warmup_steps": args.warmup, "step_s": round(step_s, 4),
                        "step_s_all": [round(x, 4) for x in times], "tokens_per_s": round(tps, 2),
                        "tflops": round(tflops, 4), "mfu": round(tflops / s["device"]["peak_tflops"], 4),
                        "flops_per_token": fpt, "loss": losses[-1], "seconds": round(time.perf_counter() - t0, 2),
                        "_mem": mem})
        log(f"  max_length {L:>6,} liger {'on ' if liger else 'off'}: {tps:,.0f} tokens/s, MFU {tflops / s['device']['peak_tflops']:.1%}, "
            f"step {step_s:.2f} s")
    return results, skipped


def _state_bytes(net, opt) -> int:
    n = sum(p.numel() * p.element_size() for p in net.parameters())
    n += sum(p.grad.numel() * p.grad.element_size() for p in net.parameters() if p.grad is not None)
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if hasattr(v, "numel") and v.dim() > 0)
    return n


def memory_row(s, r: dict) -> dict:
    """One throughput run's measured memory vs ``estimates.memory_per_gpu`` for the same single-GPU
    config (world size 1, no ZeRO)."""
    from raysft.commands import estimates as est

    cuda, m, GB = s["cuda"], r.pop("_mem"), est.GB
    e = est.memory_per_gpu(s["shape"], world_size=1, micro_batch=1, seq_len=r["max_length"], bf16=s["accel"].bf16,
                           gradient_checkpointing=s["cfg"].trainer.gradient_checkpointing, zero_stage=None,
                           fused_lm_head=cuda, gpu=cuda)
    est_states = e.params + e.grads + e.optimizer
    est_acts = e.activation_checkpoints + e.layer_activations + e.loss_head
    if cuda:
        ctx = s["device"]["context_gb"] * GB
        acts = m["peak_allocated"] - m["states"]
        peak = m["peak_reserved"] + ctx
        overhead = m["peak_reserved"] - m["peak_allocated"] + ctx
    else:
        acts = m["activations"]
        peak, overhead = m["states"] + acts, 0.0
    return {"max_length": r["max_length"], "liger": r["liger"], "peak_gb": round(peak / GB, 3),
            "states_gb": round(m["states"] / GB, 3), "activations_gb": round(acts / GB, 3),
            "overhead_gb": round(overhead / GB, 3), "estimate_gb": e.to_json(),
            "ratio": round(peak / e.total, 4) if e.total else None,
            "states_ratio": round(m["states"] / est_states, 4) if est_states else None,
            "activation_ratio": round(acts / est_acts, 4) if est_acts else None}
