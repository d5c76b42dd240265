"""wina.chat.ChatSession on the CPU: KV kept across turns (same tokens as a full re-prefill with
greedy decoding), TTFT and decode rate apart, /reset, context overflow, gate counts from the
generation itself (no second forward), dense and sparse sessions sharing one engine."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from wina.bench import engine_thresholds
from wina.chat import ChatSession, Reply
from wina.engine import Engine
from wina.errors import InvalidArgument
from wina.events import Progress
from wina.sparsify import sparsify

VOCAB = 128


class Tok:
    """Word-level tokenizer whose decode re-encodes to the same ids ("t17" <-> 17)."""
    eos_token_id = None
    chat_template = None

    def _ids(self, text):
        out = []
        for w in text.replace("\n", " \n ").split(" "):
            if not w:
                continue
            if w.startswith("t") and w[1:].isdigit() and int(w[1:]) < VOCAB:
                out.append(int(w[1:]))
            else:
                out.append(3 + sum(map(ord, w)) % (VOCAB - 3))
        return out

    def __call__(self, text, return_tensors=None):
        class R:
            pass
        r = R()
        r.input_ids = torch.tensor([self._ids(text)])
        return r

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids)


def tiny(seed=0, max_pos=256):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=max_pos,
                      eos_token_id=None, bos_token_id=None)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    m.generation_config.eos_token_id = None
    return m


TURNS = ["hello there how are you", "tell me about the city of lights", "and the river ?"]


def _sparsify(m, dense_prefix=0.0):
    thr = engine_thresholds(Engine.from_model(m, max_seq_len=64), list(range(3, 40)), 0.5)
    return sparsify(m, "wina", 0.5, gating="threshold", thresholds=thr, dense_prefix=dense_prefix)


@pytest.mark.parametrize("backend", ["engine", "transformers"])
@pytest.mark.parametrize("sparse", [False, True])
def test_kv_reuse_equals_full_prefill(backend, sparse):
    m = tiny()
    if sparse:
        _sparsify(m)
    s = ChatSession(m, Tok(), sparse=sparse, backend=backend, max_new_tokens=6, max_seq_len=200,
                    count_every=1)
    s.warm_up()
    for i, text in enumerate(TURNS):
        history = [dict(x) for x in s.messages]
        r = s.send(text)
        assert isinstance(r, Reply) and r.backend == backend and r.sparse == sparse
        assert r.tokens == 6 and r.stopped == "length"
        assert r.ttft_s > 0 and r.decode_s > 0 and r.decode_tokens_per_s > 0
        assert abs(r.seconds - (r.ttft_s + r.decode_s)) < 1e-6
        assert 0 < r.prepare_s < r.ttft_s          # the prompt's ids, then its prefill and first pick
        if i > 0:        # only what the cache did not hold was prefilled
            assert 0 < r.prefill_tokens < r.context_tokens
        # the same conversation from an empty cache (a full prefill) gives the same tokens
        fresh = ChatSession(m, Tok(), sparse=sparse, backend=backend, max_new_tokens=6, max_seq_len=200)
        fresh.messages = history
        f = fresh.send(text)
        assert f.prefill_tokens == f.context_tokens == r.context_tokens
        assert f.ids == r.ids, (i, f.ids, r.ids)
        # what the cache holds: this turn's prompt, then the reply but its last token
        held = s.context_ids()
        assert held[:r.context_tokens] == fresh.context_ids()[:r.context_tokens]
        assert held[r.context_tokens:] == r.ids[:-1] and s.context_tokens == len(held)
        if sparse:
            assert 0.2 < r.sparsity < 0.8 and r.counted_tokens > 0
        else:
            assert r.sparsity == 0.0


def test_engine_session_runs_no_transformers_forward():
    m = tiny()
    sp = _sparsify(m, dense_prefix=0.01)
    s = ChatSession(m, Tok(), backend="engine", max_new_tokens=5, max_seq_len=200, count_every=2)
    s.warm_up()
    calls = []
    h = m.model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    r1 = s.send(TURNS[0])
    r2 = s.send(TURNS[1])
    h.remove()
    assert calls == []                                  # the gate counts came from the engine's steps
    assert r1.sparsity is not None and 0.2 < r1.sparsity < 0.8
    # prompt rows (but the dense prefix) + every 2nd of the 4 decode steps
    assert r2.counted_tokens == r2.prefill_tokens + 2
    assert 0.2 < sp.measured_sparsity() < 0.8           # handed to the sparsifier's gates


def test_transformers_session_forwards_once_per_token():
    m = tiny()
    s = ChatSession(m, Tok(), sparse=False, backend="transformers", max_new_tokens=5)
    calls = []
    h = m.register_forward_pre_hook(lambda mod, args, kw: calls.append(1), with_kwargs=True)
    s.send(TURNS[0])
    r = s.send(TURNS[1])
    h.remove()
    assert len(calls) == 10                             # one prefill + 4 decode steps per reply
    assert r.prefill_tokens < r.context_tokens


@pytest.mark.parametrize("backend", ["engine", "transformers"])
def test_reset_clears_the_cache(backend):
    m = tiny()
    s = ChatSession(m, Tok(), sparse=False, backend=backend, max_new_tokens=4, system="be brief")
    r1 = s.send(TURNS[0])
    s.send(TURNS[1])
    assert s.context_tokens > r1.context_tokens
    s.reset()
    assert s.messages == [] and s.context_tokens == 0
    r = s.send(TURNS[0])
    assert r.prefill_tokens == r.context_tokens == r1.context_tokens and r.ids == r1.ids


@pytest.mark.parametrize("backend", ["engine", "transformers"])
def test_context_overflow_drops_old_turns(backend):
    m = tiny(max_pos=64)
    s = ChatSession(m, Tok(), sparse=False, backend=backend, max_new_tokens=8, max_seq_len=48)
    truncated = False
    for _ in range(4):
        r = s.send("a b c d e f g h")
        truncated |= r.truncated
        assert r.context_tokens + r.tokens <= 48
    assert truncated and len(s.messages) < 8
    # a reply after truncation equals the same (kept) conversation from scratch
    fresh = ChatSession(m, Tok(), sparse=False, backend=backend, max_new_tokens=8, max_seq_len=48)
    fresh.messages = [dict(x) for x in s.messages[:-2]]
    assert fresh.send(s.messages[-2]["content"]).ids == r.ids


@pytest.mark.parametrize("backend", ["engine", "transformers"])
def test_the_next_session_prepares_its_prompt_while_the_reply_before_decodes(backend):
    """send(prepare_next=other): after this reply's first token, the other session makes the same
    message's ids on a thread; its own send then uses them (Reply.ahead_s, no tokenizing in its
    TTFT) and answers exactly as without them."""
    import threading
    m = tiny()
    _sparsify(m)
    kw = dict(backend=backend, max_new_tokens=5, max_seq_len=200, system="be brief")
    dense, sparse = ChatSession.pair(m, Tok(), **kw)
    _, plain = ChatSession.pair(m, Tok(), **kw)          # the control: no preparing ahead
    fits: list[tuple[str, int]] = []                   # (thread, dense tokens out by then)
    streamed: list[str] = []
    real_fit = sparse._fit

    def fit(messages, max_new):
        fits.append((threading.current_thread().name, len(streamed)))
        return real_fit(messages, max_new)
    sparse._fit = fit
    for text in TURNS:
        d = dense.send(text, on_text=streamed.append, prepare_next=sparse)
        s = sparse.send(text)
        p = plain.send(text)
        assert fits[-1][0] == "wina-chat-prepare" and fits[-1][1] >= 1    # on its thread, after a token
        assert s.ahead_s > 0 and d.ahead_s == 0 == p.ahead_s
        assert s.ids == p.ids and s.context_tokens == p.context_tokens and s.prefill_tokens == p.prefill_tokens
        assert sparse.messages == plain.messages and sparse.context_ids() == plain.context_ids()
        streamed.clear()
    assert len(fits) == len(TURNS)                     # send() itself tokenized nothing
    with pytest.raises(InvalidArgument, match="another session"):
        dense.send("x", prepare_next=dense)


@pytest.mark.parametrize("backend", ["engine", "transformers"])
def test_prepared_ids_are_used_only_for_the_message_and_conversation_they_were_made_for(backend):
    from wina.errors import InvalidArgument as Bad
    m = tiny(max_pos=64)
    s = ChatSession(m, Tok(), sparse=False, backend=backend, max_new_tokens=4, max_seq_len=40)
    ref = ChatSession(m, Tok(), sparse=False, backend=backend, max_new_tokens=4, max_seq_len=40)
    assert s.prepare(TURNS[0]) > 0
    r = s.send(TURNS[1])                               # another message: made anew
    assert r.ahead_s == 0 and r.ids == ref.send(TURNS[1]).ids
    s.prepare(TURNS[0])
    s.system = "be brief"                              # another system prompt
    ref.system = "be brief"
    assert s.send(TURNS[0]).ahead_s == 0
    ref.send(TURNS[0])
    s.prepare(TURNS[2])
    s.reset()                                          # another conversation
    ref.reset()
    r = s.send(TURNS[2])
    assert r.ahead_s == 0 and r.ids == ref.send(TURNS[2]).ids
    s.prepare(TURNS[1], max_new_tokens=3)              # another reply length
    assert s.send(TURNS[1]).ahead_s == 0
    ref.send(TURNS[1])
    # a message that does not fit: nothing prepared, send() says why
    long = " ".join(["word"] * 60)
    assert s.prepare(long) == 0
    with pytest.raises(Bad, match="does not fit"):
        s.send(long)
    # a prepared message is used once
    s.prepare(TURNS[0])
    assert s.send(TURNS[0]).ahead_s > 0
    ref.send(TURNS[0])
    assert s.messages == ref.messages and s.context_ids() == ref.context_ids()


def test_a_failed_preparation_leaves_send_to_do_it(monkeypatch):
    m = tiny()
    s = ChatSession(m, Tok(), sparse=False, backend="transformers", max_new_tokens=3)

    def boom(messages, max_new):
        raise RuntimeError("tokenizer fault")
    monkeypatch.setattr(s, "_fit", boom)
    s.prepare_in_background(TURNS[0])
    s._join_preparing()
    assert s._prepared is None
    monkeypatch.undo()
    r = s.send(TURNS[0])
    assert r.ahead_s == 0 and r.tokens == 3


def _full_collections(fn):
    """How many full (generation 2) collections ran while ``fn`` ran."""
    import gc
    seen = []

    def watch(phase, info):
        if phase == "start" and info["generation"] == 2:
            seen.append(1)
    gc.callbacks.append(watch)
    try:
        fn()
    finally:
        gc.callbacks.remove(watch)
    return len(seen)


def _garbage(n=3000, keep=None):
    """Cyclic garbage (young collections), some of it kept alive in ``keep`` until the caller drops
    it (survivors that bring a full collection due)."""
    for i in range(n):
        a = []
        a.append(a)
        if keep is not None and i % 3 == 0:
            keep.append(a)


def _churn(rounds=40):
    keep = []
    for _ in range(rounds):
        _garbage(keep=keep)


@pytest.mark.parametrize("backend", ["engine", "transformers"])
def test_no_full_collection_inside_a_reply(backend):
    import gc
    from wina.collector import no_full_collection
    before = gc.get_threshold()
    gc.freeze()                         # settled, as after a warm-up: few long-lived objects to walk
    gc.collect()
    assert _full_collections(_churn) > 0                                       # what a reply would meet
    with no_full_collection():
        with no_full_collection():                                             # nested: still off
            pass
        assert _full_collections(_churn) == 0
        assert gc.get_threshold()[:2] == before[:2]                            # young ones still collected
    assert gc.get_threshold() == before
    with pytest.raises(RuntimeError), no_full_collection():
        raise RuntimeError("boom")
    assert gc.get_threshold() == before                                        # put back after a failure
    # the chat: a streaming callback that makes as much garbage meets no full collection
    m = tiny()
    s = ChatSession(m, Tok(), sparse=False, backend=backend, max_new_tokens=40, max_seq_len=200)
    keep = []
    n = _full_collections(lambda: s.send(TURNS[0], on_text=lambda d: _garbage(keep=keep)))
    assert n == 0 and gc.get_threshold() == before


@pytest.mark.parametrize("backend", ["engine", "transformers"])
def test_warm_up_freezes_what_is_alive_and_a_load_or_release_thaws_it(backend, tiny_folder):
    import gc
    from wina.chat import release_engine
    from wina.models import load
    gc.unfreeze()
    m = tiny()
    s = ChatSession(m, Tok(), sparse=False, backend=backend, max_new_tokens=4, max_seq_len=200)
    s.warm_up()
    assert gc.get_freeze_count() > 10000          # the libraries' and the model's objects
    import weakref

    class Holder:
        pass
    h = Holder()
    h.loop = h                                     # frozen, then dropped: freed by the next settle
    gone = weakref.ref(h)
    from wina.collector import settle
    settle()
    del h
    settle()
    assert gone() is None
    assert s.send(TURNS[0]).tokens == 4
    if backend == "engine":
        release_engine(m)                         # the engine's cycles (and the frozen ones) are freed
    else:
        # a model dropped after a warm-up is freed before the next one loads: a cycle held it
        import weakref
        m.loop = m                                 # a cycle only the collector frees
        gone = weakref.ref(m)
        del s, m
        load(str(tiny_folder))
        assert gone() is None
    assert gc.get_freeze_count() == 0


def test_pair_shares_one_engine_and_warm_up_reports_progress():
    m = tiny()
    _sparsify(m)
    dense, sparse = ChatSession.pair(m, Tok(), backend="engine", max_new_tokens=4, max_seq_len=128)
    events = []
    dense.warm_up(events.append)
    sparse.warm_up(events.append)
    assert dense.engine is sparse.engine and dense._cache is not sparse._cache
    assert events and all(isinstance(e, Progress) and e.stage == "warm-up" for e in events)
    d, s = dense.send(TURNS[0]), sparse.send(TURNS[0])
    assert d.sparsity == 0.0 and s.sparsity > 0.2
    d2 = dense.send(TURNS[1])                         # the sparse turn did not disturb the dense cache
    assert d2.prefill_tokens < d2.context_tokens
    fresh = ChatSession(m, Tok(), sparse=False, backend="transformers", max_new_tokens=4)
    fresh.messages = [dict(x) for x in dense.messages[:-2]]
    assert fresh.send(TURNS[1]).ids == d2.ids
    dense.close()
    sparse.close()


# ------------------------------------------------------------------------------------------------
# GPU: captured decode graphs (plain and counting), several KV caches, one copy of the weights
# ------------------------------------------------------------------------------------------------
def _cuda():
    from wina.kernels import HAS_TRITON
    return torch.cuda.is_available() and HAS_TRITON


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs CUDA and Triton")
def test_gpu_sessions_graphs_equal_eager_and_one_copy():
    from wina.chat import release_engine
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    m = m.to("cuda", torch.bfloat16)
    m.generation_config.eos_token_id = None
    _sparsify(m)
    w_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    torch.cuda.synchronize()
    other = torch.cuda.memory_allocated() - w_bytes    # what earlier tests in this process still hold
    dense, sparse = ChatSession.pair(m, Tok(), max_new_tokens=12, max_seq_len=256, one_copy=True,
                                     count_every=1, ignore_eos=True)
    assert dense.backend == "engine"
    dense.warm_up()
    sparse.warm_up()
    assert m.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"     # the engine's copy only
    assert torch.cuda.memory_allocated() - other < 1.6 * w_bytes
    rs = [sparse.send(t) for t in TURNS]
    rd = [dense.send(t) for t in TURNS]
    assert all(r.tokens == 12 and r.ttft_s > 0 and r.decode_tokens_per_s > 0 for r in rs + rd)
    assert all(0.3 < r.sparsity < 0.7 for r in rs) and all(r.sparsity == 0.0 for r in rd)
    assert rs[1].prefill_tokens < rs[1].context_tokens
    eng = sparse.engine
    eng.use_graphs = False                        # the same conversation, eager steps
    s2 = ChatSession(m, Tok(), sparse=True, max_new_tokens=12, max_seq_len=256, count_every=1, ignore_eos=True)
    r2 = [s2.send(t) for t in TURNS]
    eng.use_graphs = True
    assert [r.ids for r in r2] == [r.ids for r in rs]
    assert all(abs(a.sparsity - b.sparsity) < 0.01 for a, b in zip(rs, r2))
    release_engine(m)
    assert m.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    with torch.no_grad():
        m(torch.tensor([[1, 2, 3]], device="cuda"))


# ------------------------------------------------------------------------------------------------
# the commands: wina chat's footer, wina bench --chat (CPU, a tiny model folder)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_cli import make_tiny
    return make_tiny(tmp_path_factory.mktemp("tinychat") / "model")


def _invoke(*args, input=None):
    from typer.testing import CliRunner
    from wina.cli import app
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def test_wina_chat_footer_has_ttft_and_decode_rate(tiny_folder):
    res = _invoke("chat", tiny_folder, "--max-new-tokens", "4", "--sparsity", "0.5",
                  input="hello there\nthe city\n/exit\n")
    assert res.exit_code == 0, (res.output, res.exception)
    feet = [line for line in res.stderr.splitlines() if "first token" in line]
    assert len(feet) == 2 and all("decode" in f and "tokens/s" in f and "prefilled" in f for f in feet)


def test_wina_bench_chat_on_cpu(tiny_folder, tmp_path):
    import json
    out = tmp_path / "chat.json"
    res = _invoke("bench", "--chat", tiny_folder, "--device", "cpu", "--dtype", "float32", "--turns", "2",
                  "--user-tokens", "20", "--new-tokens", "3", "--json", out)
    assert res.exit_code == 0, (res.output, res.exception)
    data = json.loads(out.read_text())
    rows = data["turns_detail"]
    assert len(rows) == 2 and data["backend"] == "transformers"
    for m in ("dense", "sparse"):
        assert rows[1][m]["prefilled"] < rows[1][m]["context"]
        assert rows[1][m]["ttft_s"] > 0 and rows[1][m]["decode_tokens_per_s"] > 0
    assert 0.3 < rows[0]["sparse"]["sparsity"] < 0.7 and rows[0]["dense"]["sparsity"] == 0.0
    assert "per turn" in res.stdout
    assert data["count_every"] == 1 and "gates counted on every decode step" in res.stdout


@pytest.mark.parametrize("kw", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                dict(temperature=-0.5), dict(top_p=float("nan")), dict(top_p=1.5),
                                dict(max_new_tokens=0)])
def test_session_and_engine_refuse_what_they_cannot_sample_with(kw):
    """One rule (wina.generate.check_sampling) for the chat session and the engine: a NaN or infinite
    temperature is refused, not handed to the sampler ('invalid multinomial distribution')."""
    m = tiny()
    with pytest.raises(InvalidArgument, match=next(iter(kw))):
        ChatSession(m, Tok(), **kw)
    eng = Engine.from_model(m, max_seq_len=64)
    with pytest.raises(InvalidArgument, match=next(iter(kw))):
        eng.generate([5, 6, 7], **{"max_new_tokens": 4, **kw})


def test_a_tiny_temperature_samples_as_the_engine_does():
    """A temperature far below the engine's floor (1e-6) keeps the logits finite: the likeliest token."""
    from wina.generate import _sample
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 10
    assert _sample(logits, 1e-40, 0.95, torch.Generator().manual_seed(1)) == int(logits.argmax())


def test_wina_bench_chat_rejects_a_negative_count_interval(tiny_folder):
    res = _invoke("bench", "--chat", tiny_folder, "--device", "cpu", "--count-every", "-1")
    assert res.exit_code == 2
    assert "--count-every must be >= 0" in res.output and "internal error" not in res.output


def test_conversation_ids_primed_with_the_reply_tokenize_only_the_next_message(embedded):
    """After a reply, priming tokenizes it between turns: the next turn tokenizes the user's message
    and the template around it only, and its ids equal a whole tokenization."""
    from wina.generate import ConversationIds, chat_input_ids
    tok = embedded.tokenizer
    conv = ConversationIds(tok)
    conv.verify([{"role": "user", "content": "(warm-up)"}])
    reply = "A long reply about GPUs, caches and the café ✓ 😀. " * 30
    msgs = [{"role": "system", "content": "Be brief."}]
    for t in range(4):
        question = f"question {t}: and why is that so?  "
        msgs.append({"role": "user", "content": question})
        ids = conv(msgs)
        assert ids == chat_input_ids(tok, msgs)[0].tolist()
        if t > 0:
            assert conv.last_chars < len(question) + 60          # not the reply before it
        msgs.append({"role": "assistant", "content": reply + str(t)})
        conv.prime(msgs)


def test_a_chat_turn_primes_the_reply_for_the_next_one(embedded):
    """ChatSession.send tokenizes its reply after answering, so the next turn's ids cover its message."""
    from wina.chat import ChatSession
    from wina.generate import ConversationIds
    tokenized: list[int] = []

    class Spy(ConversationIds):
        def __call__(self, messages):
            ids = super().__call__(messages)
            tokenized.append(self.last_chars)
            return ids

    s = ChatSession(embedded.model, embedded.tokenizer, sparse=False, max_new_tokens=24, backend="transformers",
                    ignore_eos=True)
    s._ids = Spy(embedded.tokenizer)
    s.send("Tell me about rivers.")
    s.send("And lakes?")
    assert len(tokenized) == 2 and 0 < tokenized[1] < len("And lakes?") + 60


def test_conversation_ids_tokenize_only_the_new_text(embedded):
    """Turn by turn (replies, unicode, an edited early message, a dropped turn), the incremental ids
    equal a whole tokenization of the template, and a later turn tokenizes only its new text."""
    from wina.generate import ConversationIds, chat_input_ids
    tok = embedded.tokenizer
    conv = ConversationIds(tok)
    conv.verify([{"role": "user", "content": "(warm-up)"}])
    assert conv.on and conv.checked
    msgs = [{"role": "system", "content": "Be brief."}]
    story = "A long story about GPUs, caches and the café ✓ 😀. " * 20
    for t in range(5):
        msgs.append({"role": "user", "content": f"question {t}: why?\n\n  (spaces)  "})
        ids = conv(msgs)
        assert ids == chat_input_ids(tok, msgs)[0].tolist()
        if t > 1:
            assert conv.last_chars < len(story) + 200          # the reply and the question, not the whole
        msgs.append({"role": "assistant", "content": story + str(t)})
    msgs[1] = {"role": "user", "content": "an edited first question"}
    msgs = msgs[:1] + msgs[3:]                                  # and the first exchange dropped
    assert conv(msgs) == chat_input_ids(tok, msgs)[0].tolist()


def test_conversation_ids_tokenize_a_long_message_in_pieces(embedded, monkeypatch):
    """A long message is tokenized in pieces cut between words, in one batch: the ids equal a whole
    tokenization turn by turn; a cut rule that changes the ids is found at verify() and not used."""
    import wina.generate as G
    from wina.generate import ConversationIds, chat_input_ids
    tok = embedded.tokenizer
    conv = ConversationIds(tok)
    assert not conv.pieces                              # never before verify() compared them
    conv.verify([{"role": "user", "content": "(warm-up)"}])
    assert conv.pieces
    calls = []

    class Spy:                                          # the tokenizer, noting what it is called on
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, x, **kw):
            calls.append(x)
            return tok(x, **kw)

    conv.tok = Spy()
    long = ("The river ran past 3 bridges, a café and the old mill — naïve, résumé, 東京 😀!\n" * 40)
    msgs = [{"role": "user", "content": long}]
    for t in range(3):
        ids = conv(msgs)
        assert ids == chat_input_ids(tok, msgs)[0].tolist(), t
        msgs += [{"role": "assistant", "content": "Yes. " * 30 + str(t)}, {"role": "user", "content": long[t:]}]
    assert any(isinstance(x, list) and len(x) >= 4 for x in calls)     # batches of pieces were used
    # a cut rule that splits words apart is caught by the comparison in verify()
    monkeypatch.setattr(G, "_CUT", __import__("re").compile(r"(?<=[a-z])(?=[a-z])"))
    bad = ConversationIds(tok)
    bad.verify([{"role": "user", "content": "(warm-up)"}])
    assert bad.on and not bad.pieces
    assert bad([{"role": "user", "content": long}]) == chat_input_ids(tok, [{"role": "user", "content": long}])[0].tolist()


def test_long_message_pieces_use_the_tokenizer_threads_the_quiet_default_turned_off(embedded, monkeypatch):
    """The command line turns the tokenizer's threads off by default (quiet forks); the batch call of
    a long message's pieces still runs on them, and the setting is back after it. A user's own
    setting is kept."""
    import os
    import wina.generate as G
    from wina.generate import ConversationIds, chat_input_ids
    tok = embedded.tokenizer
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, x, **kw):
            if isinstance(x, list):
                seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
            return tok(x, **kw)

    long = "The river ran past the old mill and the bridges of the town. " * 40
    msgs = [{"role": "user", "content": long}]
    for user_false in (False, True):
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
        monkeypatch.setattr(G, "_quiet_default", False)
        if user_false:
            monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
        G.quiet_tokenizer_threads()
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        conv = ConversationIds(tok)
        conv.verify([{"role": "user", "content": "(warm-up)"}])
        conv.tok, seen[:] = Spy(), []
        assert conv(msgs) == chat_input_ids(tok, msgs)[0].tolist()
        assert seen == ["false" if user_false else "true"]
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_conversation_ids_fall_back_where_splitting_differs(embedded, monkeypatch):
    """A tokenizer for which the pieces differ from the whole (simulated) is tokenized whole."""
    from wina.generate import ConversationIds, chat_input_ids
    tok = embedded.tokenizer
    conv = ConversationIds(tok)
    real = ConversationIds._encode

    def encode(self, text, pieces=None):
        ids, a, b = real(self, text, pieces)
        return (ids + [0], a + [len(text)], b + [len(text)]) if not text.startswith("<|im_start|>system") else (ids, a, b)

    monkeypatch.setattr(ConversationIds, "_encode", encode)
    msgs = [{"role": "user", "content": "hello"}]
    conv(msgs)
    msgs += [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]
    ids = conv(msgs)
    assert not conv.on and ids == chat_input_ids(tok, msgs)[0].tolist()
    assert conv([*msgs, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]) == \
        chat_input_ids(tok, [*msgs, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])[0].tolist()
