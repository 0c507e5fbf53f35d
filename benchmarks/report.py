"""The markdown tables of the results JSON (pasted into benchmarks/README.md)."""

from __future__ import annotations


def speed_sections(results) -> list[str]:
    """The keys of the speed-table sections: "speed" (as first measured), "speed_b<batch>_s<seq>"
    (one per shape, bench_methods.section_key) and "seq1024"."""
    return [key for key in results if key in ("speed", "seq1024") or (key.startswith("speed_b") and not key.endswith("_wall_s"))]


def summarize(results) -> list[str]:
    """Markdown tables of the speed, remat, knobs and chunks sections (pasted into
    benchmarks/README.md), then the targets of issue 15. Times are medians (min in
    parentheses); ratios are of medians, "overhead" = time ratio / FLOP ratio."""
    lines = []
    for section in speed_sections(results):
        rows = results.get(section, {}).get("methods", {})
        if not rows:
            continue
        head = results[section]
        lines += [f"{section}: batch {head['batch']}, seq {head['seq']}, {head['layers']} layers, {head['rounds']} rounds",
                  "| method | GFLOP | FLOP ratio | FLOP ratio, Q/K re-run | jax ms | jax ratio | jax overhead | "
                  "jax overhead vs Q/K re-run | jax MFU | torch_ref ms | torch ratio | torch MFU | jax speedup | hf sdpa ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, row in rows.items():
            cells = [method, f"{row['flops']['total'] / 1e9:.1f}", _fmt(row.get("flop_ratio"), "{:.2f}"),
                     _fmt(row.get("flop_ratio_linear_memory"), "{:.2f}")]
            for name in ("jax", "torch_ref"):
                timing = row.get(name)
                if timing is None:
                    cells += ["", "", "", "", ""] if name == "jax" else ["", "", ""]
                    continue
                cells.append(ms_cell(timing))
                cells.append(_fmt(timing.get("time_ratio"), "{:.2f}"))
                if name == "jax":
                    cells.append(_fmt(timing.get("overhead_vs_flops"), "{:.2f}"))
                    cells.append(_fmt(timing.get("overhead_vs_linear_memory_flops"), "{:.2f}"))
                cells.append(_fmt(timing.get("mfu"), "{:.0%}"))
            cells.append(_fmt(row.get("jax_speedup_vs_torch_ref"), "{:.2f}x"))
            hf = row.get("hf_sdpa")
            cells.append("" if hf is None else ms_cell(hf))
            lines.append(markdown_row(cells))
    for section in ("remat", "knobs", "chunks"):
        groups = {group: rows for group, rows in results.get(section, {}).items() if group != "batch"}
        for group, rows in groups.items():
            lines += variant_table(f"{section}: {group}, batch {results[section]['batch']}", rows)
    return lines + [""] + targets(results)


# speed of every method against torch_ref, by (batch, seq); 3x where torch_ref's stored P is largest
SPEEDUP_TARGETS = {(8, 256): 1.25, (2, 1024): 1.25, (1, 4096): 3.0}
OVERHEAD_TARGET = 1.2  # time ratio to standard / FLOP ratio of the algorithm the JAX path ran
HF_TARGET = 0.9  # JAX standard / HF sdpa speed, at b8 s256 and b2 s1024
LONGEST_TARGET = 4.0  # longest executed JAX method1 sequence / torch_ref's, under the memory cap


def targets(results) -> list[str]:
    """The target table: each target met / missed with the numbers, from the newest speed
    section of each shape (speed_b<b>_s<s> over "speed" / "seq1024") and the longest section."""
    shapes = {}
    for key in sorted(speed_sections(results), key=lambda k: k.startswith("speed_b")):  # per-shape keys win
        head = results[key]
        if head.get("methods"):
            shapes[(head["batch"], head["seq"])] = head
    device = results.get("machine", {}).get("jax_devices", ["?"])[0]
    lines = [f"targets (JAX on {device}; torch_ref / HF on {results.get('machine', {}).get('torch_device', 'cpu')})",
             "| target | shape | status | numbers |", "|---|---|---|---|"]
    for (batch, seq), head in sorted(shapes.items(), key=lambda item: item[0][1]):
        rows, shape = head["methods"], f"{batch} x {seq}"
        want = SPEEDUP_TARGETS.get((batch, seq))
        speedups = {m: r["jax_speedup_vs_torch_ref"] for m, r in rows.items() if "jax_speedup_vs_torch_ref" in r}
        if want and speedups:
            lines.append(target_row(f"every method >= {want}x torch_ref", shape, speedups, lambda v: v >= want, "{:.2f}x"))
        overheads = {m: r["jax"]["overhead_vs_linear_memory_flops"] for m, r in rows.items()
                     if m != "standard" and "overhead_vs_linear_memory_flops" in r.get("jax", {})}
        if overheads:
            lines.append(target_row(f"time ratio <= {OVERHEAD_TARGET}x FLOP ratio", shape, overheads,
                                    lambda v: v <= OVERHEAD_TARGET, "{:.2f}"))
        standard = rows.get("standard", {})
        if (batch, seq) in ((8, 256), (2, 1024)) and "hf_sdpa" in standard and "jax" in standard:
            ratio = standard["hf_sdpa"]["median_s"] / standard["jax"]["median_s"]
            lines.append(target_row(f"standard >= {HF_TARGET}x HF sdpa", shape, {"standard": ratio},
                                    lambda v: v >= HF_TARGET, "{:.2f}x"))
    longest = results.get("longest")
    if longest:
        executed = [int(s) for s, r in longest["runs"]["jax"].items() if "failed" not in r]
        torch_seq = longest["torch"]["longest_seq"]
        ratio = max(executed) / torch_seq if executed and torch_seq else 0.0
        lines.append(f"| longest method1 sequence >= {LONGEST_TARGET}x torch_ref's, executed | "
                     f"b1, cap {longest['cap_bytes'] / 2**30:.0f} GiB | {'met' if ratio >= LONGEST_TARGET else 'missed'} | "
                     f"JAX executed {max(executed, default=0)}, torch_ref {torch_seq} ({ratio:.1f}x) |")
    return lines


def target_row(target: str, shape: str, values: dict, ok, pattern: str) -> str:
    """One row: met when `ok` holds for every method's value; the misses listed with their values."""
    misses = {m: v for m, v in values.items() if not ok(v)}
    shown = misses or values
    numbers = ", ".join(f"{m} {pattern.format(v)}" for m, v in shown.items())
    return f"| {target} | {shape} | {'missed' if misses else 'met'} | {'misses: ' if misses else ''}{numbers} |"


def variant_table(title: str, rows: dict) -> list[str]:
    """One markdown table of `timed_variants` rows (ratios against the first row)."""
    flops = any("flops_vs_first" in row for row in rows.values())
    lines = [title, "| variant | ms (min) | time ratio | XLA temp MiB | temp ratio |" + (" FLOP ratio |" if flops else ""),
             "|---|---|---|---|---|" + ("---|" if flops else "")]
    for name, row in rows.items():
        cells = [name, ms_cell(row), f"{row['time_vs_first']:.2f}",
                 f"{row['jax_memory']['temp'] / 2**20:.0f}", f"{row['temp_vs_first']:.2f}"]
        if flops:
            cells.append(f"{row['flops_vs_first']:.2f}")
        lines.append(markdown_row(cells))
    return lines


def ms_cell(timing: dict) -> str:
    """Median milliseconds with the min in parentheses."""
    return f"{timing['median_s'] * 1e3:.0f} ({timing['min_s'] * 1e3:.0f})"


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _fmt(value, pattern) -> str:
    return "" if value is None else pattern.format(value)
