"""Help: what each screen does and its keys."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# wina-tui

Training-free activation sparsity for LLM decoding. Per token, each linear layer keeps only the
inputs with the largest score: **TEAL** ranks by `|x_i|`, **WINA** by `|x_i|·‖W[:,i]‖₂`.

| key | anywhere |
|---|---|
| `F1` | this help |
| `F2` `F3` `F4` `F5` | setup · calibrate · chat · evaluate |
| `ctrl+p` | command palette (every main action) |
| `ctrl+t` | light / dark theme |
| `ctrl+q` | quit |

**Setup** (`F2`) — model (the embedded SmolLM2-135M, a recent one, a hub id or a local path,
or a preset), method, transform, target sparsity, gating, allocation, calibration source.
Fields are checked as you type; the last settings come back at the next launch.
`ctrl+g` load & chat · `ctrl+b` calibrate · `ctrl+e` evaluate · `ctrl+l` saved plans.
Greedy allocation or threshold gating needs a calibration plan: *Load & chat* builds it, then
opens the chat. In the plan list, `c` opens a plan for chat, `e` for evaluation.

**Calibrate** (`F3`) — progress per stage and per layer with an ETA from this run's pace, a log,
and three tabs (`s` `t` `a`): the score histogram of each matrix with the target's threshold
(`m` next matrix), the live greedy trajectory, and the allocation heat map filling in layer by
layer. `esc` cancels (finished layers are kept, nothing half-written), `ctrl+r` starts or resumes
(the log says where), `[` `]` browse layers, `ctrl+o` chat with the result.

**Chat** (`F4`) — one prompt goes to the dense model (left) and the sparse one (right), one after
the other on the same weights. Under each reply: tokens, time to first token, decode tokens/s,
stop reason, measured sparsity. `enter` sends · `esc` stops the streaming pane · `ctrl+n` new
conversation · `ctrl+s` sparse only. Commands: `/reset`, `/system TEXT`, `/save FILE` (`.md`:
Markdown, else JSON), `/help`; `//text` sends `/text`.

**Evaluate** (`F5`) — tasks, a limit (documents per task), methods and sparsities. Each run is
saved to the results store; `ctrl+l` browses past evaluations to compare, `ctrl+y` changes the
chart's metric, `ctrl+r` runs, `esc` cancels.

`ctrl+q` quits at once; while calibration, allocation or an evaluation runs it asks first
(a second `ctrl+q` confirms). Work in flight is cancelled; finished work is kept.

Press `esc` or `F1` to close.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help", classes="modal"):
            yield Markdown(HELP)

    def action_dismiss(self) -> None:
        self.dismiss(None)
