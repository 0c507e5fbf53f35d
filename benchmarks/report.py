"""The markdown tables of the results JSON (pasted into benchmarks/README.md)."""

from __future__ import annotations


def summarize(results) -> list[str]:
    """Markdown tables of the speed, remat, knobs and chunks sections (pasted into
    benchmarks/README.md). Times are medians (min in parentheses); ratios are of medians,
    "overhead" = time ratio / FLOP ratio."""
    lines = []
    for section in ("speed", "seq1024"):
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
    return lines


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
