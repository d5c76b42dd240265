"""The TUI's side-by-side chat, timed as a user meets it: the real app (headless, 160×48), its setup
screen filled in and Load & chat pressed, then the chat bench's scripted conversation put into the
chat screen's input one message at a time (pasted, Enter pressed ``--enter-after`` seconds later).
Per turn and pane it reads the figures the pane shows (time to first token, decode tokens/s, tokens
prefilled) and, where the model runs on the decode engine, times the engine alone on each turn's own
prompt ids (``wina.chat_bench.engine_alone``, as ``wina bench --chat`` does), so that the app's cost (the
event loop, the Markdown rendering of the streamed reply, both in the same process as the decode
loop) shows as TUI ÷ engine.

    python bench/tui_chat.py                                    # the embedded model, CPU
    python bench/tui_chat.py --shape llama-2-7b --tokenizer .devtok --turns 4 --new-tokens 128

``--shape`` writes a model folder of random weights of that shape (the tokenizer folder's vocabulary)
and loads it through the app's model field, on the GPU when there is one. The sparse pane uses WINA
with threshold gating at ``--sparsity`` per matrix, calibrated by the app on random tokens
(uniform allocation). One JSON object goes to ``--json``; a markdown table to stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class GcWatch:
    """Python's cyclic garbage collections while the app runs (every thread): a collection holds the
    interpreter's lock for its whole length, whatever the switch interval, so a long one stalls the
    decode loop. ``take()`` returns and forgets the ones since the last call."""

    def __init__(self):
        self.seen: list[tuple[int, float]] = []
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seen.append((info["generation"], time.perf_counter() - self._t0))

    def take(self) -> dict:
        seen, self.seen = self.seen, []
        full = [d for g, d in seen if g == 2]
        return {"collections": len(seen), "full": len(full), "total_ms": round(sum(d for _, d in seen) * 1e3, 1),
                "longest_full_ms": round(max(full, default=0.0) * 1e3, 1)}


def _record_replies() -> dict:
    """Each session's last Reply (its TTFT split: the ids, then the prefill), from ChatSession.send."""
    from wina.api import ChatSession
    last: dict = {}
    send = ChatSession.send

    def recording(self, *args, **kw):
        r = send(self, *args, **kw)
        last[self] = r
        return r
    ChatSession.send = recording
    return last


def model_folder(shape: str, tokenizer_dir: str, folder, layers=None) -> str:
    """Random weights of ``shape`` with the tokenizer of ``tokenizer_dir``, saved to ``folder`` (kept
    when it is there already; bench/chat_gpu.py uses it too)."""
    import torch
    folder = Path(folder)
    from transformers import AutoTokenizer
    from wina.bench import random_model, shape_config
    if (folder / "config.json").exists():
        return str(folder)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    cfg = shape_config(shape, layers)
    cfg.vocab_size = max(cfg.vocab_size, len(tok))
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(cfg, dev, torch.bfloat16 if dev == "cuda" else torch.float32, 0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return str(folder)


async def drive(app, args, out: dict) -> None:
    from textual.widgets import Input, Select
    from wina.chat_bench import chat_script, engine_alone, scratch_cache, sparse_over_dense
    from wina_tui.widgets.chat_pane import ChatPane
    size = (160, 48)
    async with app.run_test(size=size) as pilot:
        async def wait(cond, timeout):
            # a plain sleep between looks: the Pilot's pause walks every widget of the screen and
            # waits for each, work of the bench's that a user's app never does (on the app's thread,
            # beside the decode loop, every 50 ms)
            t0 = time.monotonic()
            while not cond():
                if time.monotonic() - t0 > timeout:
                    raise SystemExit(f"timed out after {timeout} s")
                await asyncio.sleep(0.05)

        setup = app.setup_screen
        setup.query_one("#method", Select).value = "wina"
        setup.query_one("#sparsity", Input).value = f"{args.sparsity:g}"
        setup.query_one("#gating", Select).value = "threshold"
        setup.query_one("#allocation", Select).value = "uniform"
        setup.query_one("#calib-source", Input).value = "random"
        await pilot.pause()
        t = time.perf_counter()
        await pilot.press("ctrl+g")
        await wait(lambda: app.screen is app.chat_screen and app.session.loaded is not None
                   and app.session.sparsifier is not None, args.timeout)
        out["load_and_calibrate_s"] = time.perf_counter() - t
        chat = app.chat_screen
        panes = {pid: chat.query_one(f"#{pid}", ChatPane) for pid in ("dense", "sparse")}
        tok = app.session.loaded.tokenizer
        script = chat_script(tok, args.turns, 90, 500, 0)
        rows, prompts = [], {}
        replies = _record_replies()
        import gc
        watch = GcWatch()
        gc.callbacks.append(watch)
        out["objects_before_chat"] = len(gc.get_objects())
        box = chat.query_one("#prompt", Input)
        for i, text in enumerate(script):
            box.value = text                            # pasted into the input, as a user would
            await asyncio.sleep(args.enter_after)       # then Enter, a moment later
            t = time.perf_counter()
            await pilot.press("enter")
            if box.value:
                raise SystemExit(f"turn {i + 1}: the chat refused the message")
            await wait(lambda: not chat.is_generating and not any(p.streaming for p in panes.values()), args.timeout)
            await pilot.pause(0.1)
            if not all(len(p.replies) == i + 1 and p.stats is not None for p in panes.values()):
                status = chat.query_one("#chat-status").render() if chat.query("#chat-status") else ""
                raise SystemExit(f"turn {i + 1} gave no reply in a pane: {status}")
            row = {"turn": i + 1, "wall_s": time.perf_counter() - t}
            if i == 0:
                row["wall_s_note"] = "includes the sessions' warm-up"
            for pid, pane in panes.items():
                st = pane.stats                         # what the pane shows for this reply
                sess = chat.sessions[pid]
                row[pid] = {"context": st.context_tokens, "prefilled": st.prefill_tokens, "tokens": st.tokens,
                            "ttft_s": st.ttft, "decode_tokens_per_s": st.decode_tps, "stopped": st.stopped,
                            "sparsity": st.sparsity, "truncated": st.truncated,
                            "ids_s": replies[sess].prepare_s,    # of the TTFT: the template and tokenization
                            "ahead_s": replies[sess].ahead_s}    # ids made while the pane before decoded
                prompts[(i, pid)] = list(sess.context_ids()[:st.context_tokens or 0])
            row["sparse_over_dense"] = sparse_over_dense(row)
            row["gc"] = watch.take()
            rows.append(row)
            print(f"turn {i + 1}: " + " · ".join(
                f"{pid} ttft {row[pid]['ttft_s'] * 1e3:.1f} ms, {row[pid]['decode_tokens_per_s'] or 0:.1f} tok/s"
                for pid in panes) + f" · gc {row['gc']}", flush=True)
        gc.callbacks.remove(watch)
        out["objects_after_chat"] = len(gc.get_objects())
        out["backend"] = chat.sessions["dense"].backend
        if out["backend"] == "engine":
            with scratch_cache(chat.sessions["dense"]) as eng:
                engine_alone(eng, rows, prompts)
        out["turns_detail"] = rows
        out["screen"] = f"{size[0]}x{size[1]}"
        t = time.perf_counter()
    out["app_exit_s"] = time.perf_counter() - t


def markdown(res: dict) -> str:
    eng = res.get("backend") == "engine"
    head = ["turn", "context", "prefilled d / s", "TTFT dense / sparse ms", "of which ids ms",
            "ids made ahead ms", "decode dense / sparse tok/s"]
    if eng:
        head += ["engine alone d / s tok/s", "TUI ÷ engine d / s", "TTFT ÷ prefill alone d / s"]
    head += ["sparse ÷ dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["turns_detail"]:
        d, s = r["dense"], r["sparse"]

        def pair(key, fmt):
            return " / ".join(fmt.format(x[key]) if x.get(key) is not None else "–" for x in (d, s))
        cells = [str(r["turn"]), str(d["context"]), pair("prefilled", "{}"),
                 " / ".join(f"{x['ttft_s'] * 1e3:.1f}" for x in (d, s)),
                 " / ".join(f"{x['ids_s'] * 1e3:.1f}" for x in (d, s)),
                 " / ".join(f"{x.get('ahead_s', 0) * 1e3:.1f}" for x in (d, s)), pair("decode_tokens_per_s", "{:.1f}")]
        if eng:
            cells += [pair("engine_decode_tokens_per_s", "{:.1f}"), pair("decode_ratio", "{:.3f}"),
                      pair("ttft_over_prefill", "{:.2f}")]
        sod = r.get("sparse_over_dense")
        cells.append(f"{sod:.3f}" if sod else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="the app's model field (default: the embedded model)")
    ap.add_argument("--shape", help="instead: random weights of this shape (wina bench's shapes), in a folder")
    ap.add_argument("--tokenizer", help="with --shape: the tokenizer folder")
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "wina-tui-chat-model"))
    ap.add_argument("--layers", type=int)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--enter-after", type=float, default=0.3,
                    help="seconds between pasting a message into the input and pressing Enter")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    from wina.api import quiet_tokenizer_threads
    quiet_tokenizer_threads()                  # as wina-tui does
    spec = args.model
    if args.shape:
        if not args.tokenizer:
            ap.error("--shape needs --tokenizer")
        t = time.perf_counter()
        spec = model_folder(args.shape, args.tokenizer, Path(args.folder), args.layers)
        print(f"model folder {spec} ({time.perf_counter() - t:.1f} s)", flush=True)
    import torch
    from wina_tui.app import WinaApp
    work = Path(tempfile.mkdtemp(prefix="wina-tui-chat-"))
    app = WinaApp(model=spec, max_new_tokens=args.new_tokens, results_dir=work / "runs", state_dir=work / "state",
                  plans_dir=work / "plans", config_dir=work / "config")
    res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "model": args.shape or args.model, "turns": args.turns, "new_tokens": args.new_tokens,
           "enter_after_s": args.enter_after,
           "gating": f"wina threshold, {args.sparsity:.0%} per matrix (uniform, calibrated by the app on random tokens)"}
    asyncio.run(drive(app, args, res))
    from wina.chat_bench import chat_targets
    res["targets"] = chat_targets(res)
    print(markdown(res))
    print(json.dumps({k: v for k, v in res.items() if k != "turns_detail"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
