"""The one way in: what the front-ends (the ``wina`` commands, the TUI) use of the library.

The pipeline itself — load, calibrate, allocate, apply, evaluate, perplexity — is :mod:`wina.pipeline`
(one file, read it top to bottom); this module adds what sits around it: presets, results files and
the comparison table, the chat session, the benchmarks, the task and data-folder rules, the files
helpers (atomic writes, locks), and the library's errors and progress events. The front-ends — the
``wina`` commands (:mod:`wina.cli`), the preset runner (:mod:`wina.runner`, behind ``wina run``)
and the TUI — import from here (and :mod:`wina.errors`, :mod:`wina.events`) and nothing deeper;
``tests/test_architecture.py`` keeps it so.
"""
from __future__ import annotations

from . import __version__, distributed  # noqa: F401
from .accounting import FlopCount, SparsityReport, flops_per_token, report  # noqa: F401
from .adapters import ADAPTERS, SUPPORTED, adapter_for  # noqa: F401
from .bench import SHAPES, random_model, run_bench, shape_config  # noqa: F401
from .chat_bench import check_settings as check_chat_bench, run_chat_bench  # noqa: F401
from .chat import ChatSession, Reply, check_text, release_engine  # noqa: F401
from .compare import chart_series, comparison_markdown, comparison_rows, comparison_table, quality_chart  # noqa: F401
from .compare import SHORT, is_best  # noqa: F401
from .calibrate import source_file as calibration_file, wikitext_path  # noqa: F401
from .data import DataSource, data_text, find_data_dir, resolve as resolve_data  # noqa: F401
from .errors import (Cancelled, DataError, InvalidArgument, ModelLoadError, PlanError,  # noqa: F401
                     TransformError, UnsupportedArchitecture, WinaError, user_error)
from .evaluate import _check_limit as check_limit  # noqa: F401
from .events import CancelToken, Progress, ProgressCallback, format_duration  # noqa: F401
from .files import (LOCK_NAME, check_name, check_writable, locked, name_problem, recover_folder, replace_folder,  # noqa: F401
                    sha256 as file_sha256, sweep_temps, write_json, write_text as atomic_write_text)
from .hub import model_availability  # noqa: F401
from .generate import (Generation, chat_input_ids, generation_backend, quiet_libraries, quiet_tokenizer_threads,  # noqa: F401
                       stream_generate, stream_reply, warm_up)
from .models import EMBEDDED, EMBEDDED_PACKAGE, Loaded, cache_dir, embedded_gguf, resolve_dtype, resolve_source  # noqa: F401
from .perplexity import PerplexityResult, check_max_tokens, read_text  # noqa: F401
from .pipeline import (Allocation, Calibration, Evaluation, SparseOptions, allocate, allocation_change,  # noqa: F401
                       allocation_finished, allocation_label, allocation_work, apply, calibrate, evaluate, load,
                       perplexity, plan_damage, plan_info, resolve_device, same_calibration, sparse_options)
from .plan import (LayerHistogram, Plan, TrajectoryRow, allocating_folder, nearest_row, plan_folders,  # noqa: F401
                   plan_histogram, plan_trajectory)
from .plan_meta import DATA_ROTATIONS, PLAN_ROTATIONS as ROTATIONS  # noqa: F401
from .presets import Preset, PresetError, Variant, list_presets, load_preset  # noqa: F401
from .results import Run, load_run, load_runs, locked_output  # noqa: F401
from .sampling import check_sampling  # noqa: F401
from .scores import BINS_PER_OCTAVE, LO_EXP, N_BINS, matrix_threshold  # noqa: F401
from .sparsify import GATINGS, METHODS, Sparsifier, sparsify  # noqa: F401
from .tasks import TASKS, check_local, known_tasks, parse_tasks, read_docs  # noqa: F401
from .transform import is_transformed  # noqa: F401

prepare = apply          # the older name

__all__ = [n for n in dir() if not n.startswith("_")]
