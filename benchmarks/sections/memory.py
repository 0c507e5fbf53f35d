"""memory: compiled train-step memory vs sequence length and depth, the stored Q/K state, and the
peak RSS of one step in a child process."""

from __future__ import annotations

from child import describe_child, run_child
from harness import GiB, compiled_memory, jax_train_step, random_ids, stored_state_bytes


def run(args) -> dict:
    """Compiled memory vs sequence length (L=8, b=1) and depth (s=256, b=1) for a few methods,
    plus the measured peak RSS of one step (child process) for jax and torch_ref."""
    import jax.numpy as jnp

    methods = [m for m in ("standard", "method1", "method2", "method5.1") if m in args.methods] or ["standard", "method1"]
    out = {"seq": {}, "depth": {}, "rss": {}}
    for method in methods:
        for seq in (256, 1024, 4096):
            step, params, cfg = jax_train_step(method, 8, seq)
            memory, _ = compiled_memory(step, params, jnp.asarray(random_ids(1, seq)))
            memory["stored_qk_bytes"] = stored_state_bytes(cfg, 1, seq) if method != "standard" else 0
            out["seq"].setdefault(method, {})[seq] = memory
            print(f"  memory {method:9s} L=8 s={seq:5d}: temp {memory['temp'] / 2**20:8.1f} MiB  "
                  f"stored Q/K {memory['stored_qk_bytes'] / 2**20:6.1f} MiB", flush=True)
        for layers in (4, 8, 16):
            for remat in ("recompute", "layer") if method != "standard" else ("recompute",):
                step, params, cfg = jax_train_step(method, layers, 256, remat=remat)
                memory, _ = compiled_memory(step, params, jnp.asarray(random_ids(1, 256)))
                memory["stored_qk_bytes"] = stored_state_bytes(cfg, 1, 256) if method != "standard" else 0
                out["depth"].setdefault(method if remat == "recompute" else f"{method} remat=layer", {})[layers] = memory
                print(f"  memory {method:9s} remat={remat:9s} L={layers:2d} s=256: "
                      f"temp {memory['temp'] / 2**20:8.1f} MiB", flush=True)
    cap = int(args.mem_cap_gb * GiB)
    for method in ("standard", "method1"):
        for seq in (256, 1024) if args.quick else (256, 1024, 2048):
            for framework in ("jax", "torch"):
                report = run_child(framework, method, seq, 1, 8, cap, args.child_timeout_s)
                out["rss"].setdefault(method, {}).setdefault(framework, {})[seq] = report
                print(f"  rss {method:9s} {framework:5s} s={seq:5d}: " + describe_child(report), flush=True)
    return out
