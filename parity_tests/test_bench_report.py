"""benchmarks/report.py's target table (issue targets of the speed benchmark), on made-up
results: each target met or missed by the numbers, the per-shape section winning over the
older one of the same shape, and only executed sequences counting for the longest target."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import report  # noqa: E402


def speed_section(batch, seq, **methods):
    """methods: name -> (jax s, torch_ref s, FLOP ratio of the Q/K re-run); standard also HF."""
    rows = {}
    for name, (jax_s, torch_s, flop_ratio) in methods.items():
        row = {"jax": {"median_s": jax_s, "overhead_vs_linear_memory_flops": jax_s / methods["standard"][0] / flop_ratio},
               "torch_ref": {"median_s": torch_s}, "jax_speedup_vs_torch_ref": torch_s / jax_s}
        if name == "standard":
            row["hf_sdpa"] = {"median_s": 0.95 * jax_s}
        rows[name] = row
    return {"batch": batch, "seq": seq, "methods": rows}


def test_target_table_says_met_or_missed_with_the_numbers():
    results = {
        "machine": {"jax_devices": ["cpu"], "torch_device": "cpu"},
        "speed": speed_section(8, 256, standard=(1.0, 1.0, 1.0), method1=(2.0, 1.0, 2.0)),  # older, same shape
        "speed_b8_s256": speed_section(8, 256, standard=(1.0, 1.5, 1.0), method1=(2.0, 3.0, 1.5)),
        "speed_b1_s4096": speed_section(1, 4096, standard=(1.0, 4.0, 1.0), method1=(2.0, 5.0, 2.0)),
        "longest": {"cap_bytes": 8 * 2**30, "torch": {"longest_seq": 2048},
                    "runs": {"jax": {"4096": {}, "8192": {}, "16384": {"failed": "memory cap"}}}},
    }
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in report.targets(results)[3:]}
    assert "| met | standard 1.50x, method1 1.50x |" in rows[("every method >= 1.25x torch_ref", "8 x 256")]
    assert "| missed | misses: method1 1.33 |" in rows[("time ratio <= 1.2x FLOP ratio", "8 x 256")]
    assert "| met | standard 0.95x |" in rows[("standard >= 0.9x HF sdpa", "8 x 256")]
    assert "| missed | misses: method1 2.50x |" in rows[("every method >= 3.0x torch_ref", "1 x 4096")]
    assert "| met | method1 1.00 |" in rows[("time ratio <= 1.2x FLOP ratio", "1 x 4096")]
    assert ("standard >= 0.9x HF sdpa", "1 x 4096") not in rows  # not a target at that shape
    assert "| met | JAX executed 8192, torch_ref 2048 (4.0x) |" in \
        rows[("longest method1 sequence >= 4.0x torch_ref's, executed", "b1, cap 8 GiB")]
