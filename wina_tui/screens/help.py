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
Fields are checked as you type. `ctrl+g` load & chat · `ctrl+b` calibrate · `ctrl+e` evaluate.
Greedy allocation or threshold gating needs a calibration plan: *Load & chat* calibrates first.

**Calibrate** (`F3`) — progress per stage and per layer with ETA, a log, the live greedy
trajectory (error against effective sparsity for the current layer) and, when done, the
allocation per layer and matrix. `esc` cancels (finished layers are kept, nothing half-written),
`ctrl+r` starts or resumes, `[` `]` browse layers' trajectories, `ctrl+o` chat with the result.

**Chat** (`F4`) — one prompt goes to the dense model (left) and the sparse one (right), one after
the other on the same weights. Each pane shows tokens/s, the measured sparsity and the FLOP
fraction of dense. `enter` sends · `esc` stops · `ctrl+n` new conversation · `ctrl+s` sparse only.

**Evaluate** (`F5`) — tasks, a limit (documents per task), methods and sparsities. Each run is
saved to the results store; `ctrl+l` loads earlier runs to compare, `ctrl+y` changes the chart's
metric, `ctrl+r` runs, `esc` cancels.

Press `esc` or `F1` to close.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help", classes="modal"):
            yield Markdown(HELP)

    def action_dismiss(self) -> None:
        self.dismiss(None)
