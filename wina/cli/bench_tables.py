"""The tables of ``wina bench`` and ``wina bench --chat`` (rich), from the library's result dicts."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_bench(res: dict, console=None) -> None:
    """Rich tables of a :func:`run_bench` result."""
    con = console or Console()
    con.print(f"[bold]wina bench[/] {res['date']} · {res['device']} · {res['dtype']} · method {res['method']} · "
              f"copy bandwidth {res['copy_bw_tb_s']:.2f} TB/s · prompt {res['prompt_len']} · new {res['new_tokens']}")
    tab = Table(title="decode tokens/s (batch 1)")
    for c in ["model", "floor", "transformers", "dense", "dense/floor",
              *[f"sparse {float(s):.0%}" for s in res["sparsities"]]]:
        tab.add_column(c, justify="right")
    for r in res["models"]:
        if "error" in r:
            tab.add_row(r["model"], f"[red]{r['error'][:60]}[/]")
            continue
        cells = [r["model"], f"{r['floor_tokens_per_s']:.0f}",
                 f"{r['hf']['tokens_per_s']:.1f}" if "hf" in r else "-",
                 f"{r['dense']['decode_tokens_per_s']:.0f}", f"{r['dense']['of_floor']:.2f}"]
        for s in res["sparsities"]:
            x = r["sparse"].get(f"{float(s):.2f}")
            cells.append(f"{x['decode_tokens_per_s']:.0f} ({x['speedup_vs_dense']:.2f}×, "
                         f"{x['realized_sparsity']:.0%})" if x else "-")
        tab.add_row(*cells)
    con.print(tab)
    if res.get("kernels"):
        kt = Table(title=f"GEMV kernels ({res.get('kernel_model')}, batch 1)")
        for c in ["kernel", "K×N", "variant", "time µs", "MB read", "TB/s", "of copy bw", "programs", "regs"]:
            kt.add_column(c, justify="right")
        for r in res["kernels"]:
            v = r["variant"] + ("" if r.get("sparsity") is None else f" {r['sparsity']:.0%}")
            if "error" in r:
                kt.add_row(r["kernel"], f"{r['K']}×{r['N']}", v, f"[red]{r['error'][:40]}[/]")
                continue
            kt.add_row(r["kernel"], f"{r['K']}×{r['N']}", v, f"{r['time_us']:.1f}", f"{r['bytes_read'] / 1e6:.1f}",
                       f"{r['tb_per_s']:.2f}", f"{r['of_copy_bw']:.2f}", str(r.get("programs", "")),
                       str(r.get("regs", "")) + (f" ({r['spills']} spilled)" if r.get("spills") else ""))
        con.print(kt)
    _print_targets(con, res, "targets")


def _count_note(every) -> str:
    if every is None:
        return ""
    if every == 0:
        return "gates not counted · "
    return "gates counted on every decode step · " if every == 1 else f"gates counted once every {every} decode steps · "


def print_chat_bench(res: dict, console=None) -> None:
    con = console or Console()
    con.print(f"[bold]wina bench --chat[/] {res['date']} · {res['device']} · {res['dtype']} · {res.get('model', '')} · "
              f"{res['gating']} · {res['new_tokens']} new tokens per reply · backend {res.get('backend')} · "
              f"{_count_note(res.get('count_every'))}warm-up {res.get('warm_up_s', 0):.1f} s")
    tab = Table(title="per turn (side by side: dense, then sparse, one engine)")
    for c in ["turn", "context", "prefilled", "mode", "TTFT ms", "of which ids ms", "prefill alone ms", "decode tok/s",
              "engine tok/s", "chat/engine", "sparsity", "sparse/dense"]:
        tab.add_column(c, justify="right")
    for r in res["turns_detail"]:
        for m in ("dense", "sparse"):
            c = r[m]
            pa = c.get("engine_prefill_s")
            tab.add_row(str(r["turn"]) if m == "dense" else "", str(c["context"]), str(c["prefilled"]), m,
                        f"{c['ttft_s'] * 1000:.1f}", f"{c.get('prepare_s', 0) * 1000:.1f}",
                        f"{pa * 1000:.1f}" if pa else "-",
                        f"{c['decode_tokens_per_s']:.1f}",
                        f"{c['engine_decode_tokens_per_s']:.1f}" if c.get("engine_decode_tokens_per_s") else "-",
                        f"{c['decode_ratio']:.3f}" if c.get("decode_ratio") else "-",
                        "-" if c["sparsity"] is None else f"{c['sparsity']:.1%}",
                        f"{r['sparse_over_dense']:.2f}×" if (m == "sparse" and r.get("sparse_over_dense")) else "")
    con.print(tab)
    if res.get("memory"):
        mm = res["memory"]
        con.print(f"peak GPU memory {mm['peak_allocated_gib']:.2f} GiB allocated ({mm['peak_reserved_gib']:.2f} reserved) · "
                  f"weights {mm['weight_gib']:.2f} GiB · two KV caches {mm['kv_caches_gib']:.2f} GiB · "
                  f"(peak − KV) / weights {mm['peak_minus_kv_over_weights']:.3f}")
    if res.get("prefill_512"):
        p = res["prefill_512"]
        con.print(f"512-token prefill: dense {p['dense_s'] * 1000:.1f} ms, sparse {p['sparse_s'] * 1000:.1f} ms "
                  f"({p['sparse_over_dense']:.2f}×)")
    _print_targets(con, res, "targets (issue 19)")


def _print_targets(con, res: dict, title: str) -> None:
    """The ``targets`` block of a benchmark result as a table: value and whether it is met."""
    if not res.get("targets"):
        return
    tt = Table(title=title)
    tt.add_column("target")
    tt.add_column("value", justify="right")
    tt.add_column("met")
    for k, (v, ok) in res["targets"].items():
        tt.add_row(k, f"{v}", "[green]yes[/]" if ok else "[red]no[/]")
    con.print(tt)
