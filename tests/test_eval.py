"""Evaluation: perplexity / bpb, lm-eval downstream tasks (offline copies), the Hydra entry.

The downstream tests score a tiny random LlamaForCausalLM with the repo's GPT-2 tokenizer through
lm-eval itself; they check plumbing and equivalences (prompts == upstream lm-eval, in-process ==
lm-eval's own HF path), not accuracy.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIRS = [ROOT / "data" / "tokenizer" / "gpt2", ROOT.parent / "shared" / "data" / "tokenizer" / "gpt2"]

pytest.importorskip("lm_eval")

from eval import downstream as ds  # noqa: E402
from eval.perplexity import evaluate_perplexity, loss_by_position, write_loss_by_position  # noqa: E402


def _tiny_llama(vocab_size, seed=0, hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    from transformers import AutoTokenizer

    path = next((p for p in TOKENIZER_DIRS if (p / "tokenizer.json").is_file() or (p / "vocab.json").is_file()), None)
    if path is None:
        pytest.skip("GPT-2 tokenizer not found")
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def tokenizer():
    return _gpt2()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_llama(64 * math.ceil(len(tokenizer) / 64))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, tokenizer):
    """A run dir with an exported HF model (``run/hf``) and a minimal config.yaml / summary.json."""
    run = tmp_path_factory.mktemp("run_tiny")
    model.save_pretrained(run / "hf")
    tokenizer.save_pretrained(run / "hf")
    (run / "config.yaml").write_text("model:\n  name: tiny_llama\n  arch: transformer\ndata:\n  name: sotu\n")
    (run / "summary.json").write_text(json.dumps({"params": model.num_parameters(), "tokens": 1000}))
    return run


# ------------------------------------------------------------------------------------------------
# perplexity
# ------------------------------------------------------------------------------------------------
def _batches(vocab=97, B=3, T=12, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (B, T + 1), generator=g)
        pos = torch.arange(T).repeat(B, 1)
        pos[1, 5:] = torch.arange(T - 5)  # a document starts inside row 1
        out.append({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].clone(), "position_ids": pos})
    return out


def test_perplexity_matches_independent_cross_entropy():
    model = _tiny_llama(97, hidden=16)
    batches = _batches()
    batches[1]["labels"][0, :4] = -100  # ignored targets
    res = evaluate_perplexity(model, batches, device="cpu")
    with torch.no_grad():
        # use_cache=False: a plain Llama in eval mode builds a cache and then ignores the document start in row 1
        logits = torch.cat([model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
                            for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    ref = F.cross_entropy(logits.reshape(-1, 97), labels.reshape(-1), ignore_index=-100)
    assert res["tokens"] == int((labels != -100).sum()) == 2 * 3 * 12 - 4
    assert res["loss"] == pytest.approx(ref.item(), rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(ref.item()), rel=1e-6)
    assert res["bpb"] is None


def test_bits_per_byte_by_hand():
    model = _tiny_llama(11, hidden=16)
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[4, 5, -100]]),
             "position_ids": torch.tensor([[0, 1, 2]])}
    byte_lengths = [1, 1, 2, 3, 4, 2, 1, 1, 1, 1, 1]
    res = evaluate_perplexity(model, [batch], byte_lengths=byte_lengths)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0], -1)
    nll = -(logp[0, 4] + logp[1, 5]).item()  # nats over targets 4 and 5
    assert res["bytes"] == 4 + 2
    assert res["bpb"] == pytest.approx(nll / (math.log(2) * 6), rel=1e-6)
    assert res["loss"] == pytest.approx(nll / 2, rel=1e-6)


def test_loss_by_position_and_file(tmp_path):
    model = _tiny_llama(97, hidden=16)
    batches = _batches()
    with torch.no_grad():
        nll = torch.stack([F.cross_entropy(model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                                                 use_cache=False).logits
                                           .transpose(1, 2), b["labels"], reduction="none") for b in batches])
    by_row = loss_by_position(model, batches)
    assert by_row.shape == (12,)
    torch.testing.assert_close(by_row, nll.mean(dim=(0, 1)).double(), rtol=1e-6, atol=1e-6)
    by_doc, counts = loss_by_position(model, batches, by="document", return_counts=True)
    pos = torch.stack([b["position_ids"] for b in batches])
    for p in (0, 3, 11):
        assert by_doc[p].item() == pytest.approx(nll[pos == p].double().mean().item(), rel=1e-6)
        assert counts[p].item() == (pos == p).sum().item()
    path = write_loss_by_position(tmp_path, model, batches)
    d = json.loads(path.read_text())
    assert path == tmp_path / "loss_by_position.json" and d["by"] == "row" and len(d["loss"]) == 12
    assert d["tokens"] == [6] * 12 and d["mean_loss"] == pytest.approx(nll.mean().item(), rel=1e-6)


def test_perplexity_on_pipeline_batches(model, tokenizer):
    pipeline = pytest.importorskip("data.pipeline")
    cfg = pipeline.DataConfig(seq_len=32, validation_rows=4)
    batches = pipeline.validation_batches(cfg, tokenizer, batch_size=2)
    stats = pytest.importorskip("data.stats")
    table = stats.token_byte_lengths(tokenizer)
    res = evaluate_perplexity(model, batches, byte_lengths=table)
    assert res["tokens"] == 4 * 32 and math.isfinite(res["loss"])
    labels = torch.cat([b["labels"] for b in batches])
    text_bytes = sum(len(tokenizer.decode([t]).encode("utf-8")) for t in labels.flatten().tolist()
                     if t != tokenizer.eos_token_id)  # approximate: a split multi-byte char decodes to U+FFFD
    assert res["bytes"] == int(table[labels].sum()) and abs(res["bytes"] - text_bytes) <= 0.05 * text_bytes
    assert res["bpb"] == pytest.approx(res["nll_sum"] / (math.log(2) * res["bytes"]))
    assert loss_by_position(model, batches).shape == (32,)


# ------------------------------------------------------------------------------------------------
# perplexity that cannot cross documents: any HF model, every architecture's export, any corpus
# ------------------------------------------------------------------------------------------------
EOS = 96
DOCS = (5, 11, 3, 20, 7, 9, 14, 4)  # document lengths (without EOS); rows of 24 inputs hold whole documents


def _docs(lengths=DOCS, vocab=96, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _rows_of_whole_documents(docs, per_row):
    """Packed rows built by hand: ``[EOS] d1 [EOS] d2 ... [EOS]``, positions restarting at each EOS input."""
    batches = []
    for i in range(0, len(docs), per_row):
        row, pos = [EOS], []
        for d in docs[i:i + per_row]:
            row += [*d, EOS]
            pos += list(range(len(d) + 1))
        batches.append({"input_ids": torch.tensor([row[:-1]]), "labels": torch.tensor([row[1:]]),
                        "position_ids": torch.tensor([pos])})
    return batches


def _per_document_nll(model, docs):
    """Reference: each ``[EOS] doc [EOS]`` through a plain forward alone, F.cross_entropy, token-weighted mean."""
    total, n = 0.0, 0
    with torch.no_grad():
        for d in docs:
            seq = torch.tensor([[EOS, *d, EOS]])
            logits = model(input_ids=seq[:, :-1]).logits.float()
            total += F.cross_entropy(logits[0], seq[0, 1:], reduction="sum").item()
            n += len(d) + 1
    return total / n, n


def test_plain_llama_export_with_use_cache_scores_packed_rows_per_document(tmp_path):
    """A plain ``LlamaForCausalLM`` saved with ``use_cache: true`` (as every export is) and reloaded: its
    perplexity on packed multi-document rows is the per-document one.
    Mutation: drop ``use_cache=False`` in ``eval.perplexity._logits`` -> the packed loss reads 4.58034 against
    4.58012 (a random model attends almost uniformly), fails."""
    from transformers import AutoModelForCausalLM

    _tiny_llama(97, hidden=32).save_pretrained(tmp_path / "llama")
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["use_cache"] is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    docs = _docs()
    ref, n = _per_document_nll(model, docs)
    res = evaluate_perplexity(model, _rows_of_whole_documents(docs, per_row=4))
    assert res["tokens"] == n
    assert res["loss"] == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("arch,config", [
    ("transformer", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}),
    ("mamba2", {"hidden_size": 32, "num_hidden_layers": 2, "head_dim": 16, "state_size": 8, "chunk_size": 8}),
    ("pararnn", {"cell": "gru", "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2}),
    ("pararnn", {"cell": "lstm", "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2}),
])
def test_every_export_scores_packed_rows_per_document(arch, config, tmp_path):
    """Each architecture's export, loaded as eval loads it (``load_causal_lm``), through both protocols of
    ``score``: packed rows (the training layout) and per-document windows equal the per-document reference
    when every document fits a row. Mutation: ``load_causal_lm`` through ``AutoModelForCausalLM`` for Mamba2
    (transformers' class, no resets) -> the packed isolation check refuses it, fails."""
    from eval.perplexity import load_causal_lm, score
    from models.registry import build_model

    torch.manual_seed(0)
    build_model(arch, {**config, "vocab_size": 128, "bos_token_id": EOS, "eos_token_id": EOS}).save_pretrained(
        tmp_path / arch)
    model = load_causal_lm(tmp_path / arch).eval()

    class Tok:  # what score() needs of a tokenizer: the EOS id and byte lengths
        eos_token_id = EOS
        all_special_ids = [EOS]
        added_tokens_decoder = {}

        def __len__(self):
            return 128

        def convert_ids_to_tokens(self, ids):
            return ["a" * (1 + i % 3) for i in ids]

    docs = _docs()
    ref, n = _per_document_nll(model, docs)
    for protocol in ("packed", "documents"):
        res = score(model, Tok(), docs, protocol=protocol, seq_len=96, batch_size=3, device="cpu")
        assert res["tokens"] == n and res["protocol"] == protocol
        assert res["loss"] == pytest.approx(ref, rel=1e-5), protocol
        assert res["bytes"] == sum(1 + t % 3 for d in docs for t in d)  # EOS: 0 bytes


def test_packed_protocol_refuses_a_model_that_leaks(tmp_path):
    """transformers' own Mamba2ForCausalLM ignores document starts: ``packed`` refuses it, ``documents`` scores
    it per document. Mutation: ``check_packed_isolation`` never raising -> fails."""
    from transformers import Mamba2ForCausalLM

    from eval.perplexity import check_packed_isolation, document_batches
    from models.registry import build_model

    torch.manual_seed(0)
    ours = build_model("mamba2", {"hidden_size": 32, "num_hidden_layers": 2, "head_dim": 16, "state_size": 8,
                                  "chunk_size": 8, "vocab_size": 128})
    ours.save_pretrained(tmp_path / "m")
    hf = Mamba2ForCausalLM.from_pretrained(tmp_path / "m").eval()
    with pytest.raises(ds.ConfigError, match=r"Mamba2ForCausalLM lets the documents of a packed row see each other"):
        check_packed_isolation(hf)
    assert check_packed_isolation(ours) < 1e-5
    docs = _docs()
    ref, _ = _per_document_nll(hf, docs)
    assert evaluate_perplexity(hf, document_batches(docs, 8, 4, EOS))["loss"] != pytest.approx(ref, rel=1e-3)
    assert evaluate_perplexity(hf, document_batches(docs, 64, 4, EOS))["loss"] == pytest.approx(ref, rel=1e-5)


def test_document_windows_and_packed_rows_layout():
    """Windows of seq_len + 1 overlapping by one score every target once; the packed rows' last row is
    filled with ignored targets. Mutation: no closing EOS in ``packed_batches`` -> a target missing, fails."""
    from eval.perplexity import document_batches, packed_batches

    docs = [list(range(10)), list(range(20, 23))]
    wins = document_batches(docs, seq_len=4, batch_size=8, eos_id=EOS)
    (batch,) = wins
    targets = batch["labels"][batch["labels"] != -100].tolist()
    assert sorted(targets) == sorted([*range(10), EOS, 20, 21, 22, EOS])
    assert batch["input_ids"][0].tolist() == [EOS, 0, 1, 2] and "position_ids" not in batch
    rows = packed_batches(docs, seq_len=8, batch_size=2, eos_id=EOS)
    stream = [EOS, *range(10), EOS, 20, 21, 22, EOS]
    got = torch.cat([b["labels"].flatten() for b in rows])
    assert got[got != -100].tolist() == stream[1:]
    pos = torch.cat([b["position_ids"].flatten() for b in rows]).tolist()
    assert pos[:14] == [*range(11), 0, 1, 2]


def test_perplexity_cli_on_a_local_file(tmp_path):
    """``python -m eval.perplexity DIR --data FILE``: the exported model's per-document perplexity of a jsonl
    corpus, as the reference computes it with the tokenizer's ids; a bad input fails in one line."""
    tok = _gpt2()
    torch.manual_seed(0)
    model = _tiny_llama(64 * math.ceil(len(tok) / 64), hidden=16)
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    texts = ["The union is strong.", "We the people, in order to form a more perfect union.", "Thank you."]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "eval.perplexity", str(tmp_path / "hf"), "--data", "c.jsonl", "--text-field", "body",
           "--seq-len", "8", "--out", str(tmp_path / "ppl.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "ppl.json").read_text())
    eos = tok.eos_token_id
    total, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            seq = [eos, *tok(t)["input_ids"], eos]
            for i in range(0, len(seq) - 1, 8):  # windows of 9 tokens, overlapping by one
                w = torch.tensor([seq[i:i + 9]])
                total += F.cross_entropy(model(input_ids=w[:, :-1]).logits[0], w[0, 1:], reduction="sum").item()
                n += w.shape[1] - 1
    assert res["tokens"] == n and res["documents"] == 3 and res["protocol"] == "documents"
    assert res["loss"] == pytest.approx(total / n, rel=1e-5)
    assert res["bytes"] == sum(len(t.encode()) for t in texts)
    bad = subprocess.run(cmd[:5] + ["missing.jsonl"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "missing.jsonl" in bad.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------
# task directory, presets, prompt parity with upstream lm-eval
# ------------------------------------------------------------------------------------------------
def test_task_templates_and_generated_dir(tmp_path):
    for f in ds.TASKS_DIR.iterdir():
        if f.suffix == ".yaml" or f.name.endswith("_yaml"):
            text = f.read_text()
            assert "/work/" not in text and "data_files" in text and ds.PLACEHOLDER in text, f.name
    out = ds.write_task_dir(None, tmp_path / "tasks")
    arc = (out / "local_arc_easy.yaml").read_text()
    assert ds.PLACEHOLDER not in arc and str(ds.SHIPPED_DATA / "arc_easy" / "validation.jsonl.gz") in arc
    assert len(list(out.glob("local_mmlu_*.yaml"))) == 57 and (out / "local_mmlu.yaml").is_file()
    # another data root: every file the tasks need is checked, the error names the missing one
    root = tmp_path / "root"
    (root / "piqa").mkdir(parents=True)
    (root / "piqa" / "validation.jsonl.gz").write_bytes((ds.SHIPPED_DATA / "piqa" / "validation.jsonl.gz").read_bytes())
    ds.check_data(ds.resolve_data_root(root), ["local_piqa"])
    with pytest.raises(ds.ConfigError, match=r"local_arc_easy needs arc_easy/validation.jsonl.gz"):
        ds.check_data(ds.resolve_data_root(root), ["local_piqa", "local_arc_easy"])
    with pytest.raises(ds.ConfigError, match=r"data_root=.*nope.*directory not found"):
        ds.resolve_data_root(tmp_path / "nope")
    full = ROOT.parent / "shared" / "data" / "eval"
    if full.is_dir():  # the shipped slices' layout is the full sets' layout
        ds.check_data(ds.resolve_data_root(full), list(ds.LOCAL_TASKS))


def test_presets():
    assert {"smoke", "paper", "mamba_zeroshot"} <= set(ds.preset_names())
    name, specs, limit = ds.resolve_tasks("paper")
    assert name == "paper" and limit is None
    assert [(s.task, s.num_fewshot) for s in specs] == [
        ("local_arc_challenge", 25), ("local_arc_challenge", 3), ("local_hellaswag", 10), ("local_hellaswag", 0),
        ("local_openbookqa", 10), ("local_openbookqa", 0), ("local_winogrande", 5), ("local_winogrande", 0),
        ("local_piqa", 0), ("local_mmlu", 0)]
    _, specs, _ = ds.resolve_tasks("mamba_zeroshot")
    assert [s.task for s in specs][0] == "lambada_openai" and all(s.num_fewshot == 0 for s in specs)
    assert ds.resolve_tasks("smoke")[2] == 20 and ds.resolve_tasks("smoke", limit=3)[2] == 3
    specs = ds.parse_task_specs(["local_piqa", "local_arc_easy:5", {"task": "x", "num_fewshot": 2}])
    assert [s.key for s in specs] == ["local_piqa|0", "local_arc_easy|5", "x|2"]
    with pytest.raises(ds.ConfigError) as err:
        ds.resolve_tasks("nonexistent_preset")
    assert "tasks='nonexistent_preset'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ds.ConfigError, match="unknown local task"):
        ds.run_downstream(None, tasks=["local_nope"])


UPSTREAM = {  # local task -> (upstream YAML under lm_eval/tasks, data dir, extra)
    "local_arc_easy": ("arc/arc_easy.yaml", "arc_easy", None),
    "local_arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge", None),
    "local_hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag", None),
    "local_piqa": ("piqa/piqa.yaml", "piqa", None),
    "local_winogrande": ("winogrande/default.yaml", "winogrande_xl", None),
    "local_openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa", None),
    "local_boolq": ("super_glue/boolq/default.yaml", "boolq", "boolq"),
    "local_sciq": ("sciq/sciq.yaml", "sciq", None),
    "local_social_iqa": ("siqa/siqa.yaml", "social_iqa", None),
    "local_commonsense_qa": ("commonsense_qa/default.yaml", "commonsense_qa", None),
    "local_copa": ("super_glue/copa/default.yaml", "copa", None),
    "local_mmlu_anatomy": ("mmlu/default/mmlu_anatomy.yaml", "mmlu", "anatomy"),
    "local_mmlu_high_school_us_history": ("mmlu/default/mmlu_high_school_us_history.yaml", "mmlu",
                                          "high_school_us_history"),
}


def test_prompts_match_upstream_lm_eval(tmp_path):
    """Every request (context, continuation) our tasks build equals the one the installed upstream
    lm-eval task builds from the same rows, 0-shot and 3-shot (upstream config with only the
    dataset location swapped)."""
    import importlib.util

    import lm_eval.tasks as lm_tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    up_dir = Path(lm_tasks.__file__).parent
    task_dir = ds.write_task_dir(None, tmp_path / "tasks")
    spec = importlib.util.spec_from_file_location("ltu_test", task_dir / "local_task_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    # MMLU: all 57 per-subject headers equal upstream's descriptions
    upstream_subjects = {p.stem[len("mmlu_"):] for p in (up_dir / "mmlu" / "default").glob("mmlu_*.yaml")}
    assert set(utils.MMLU_SUBJECTS) == upstream_subjects
    for subject in utils.MMLU_SUBJECTS:
        ours = load_yaml(task_dir / f"local_mmlu_{subject}.yaml", resolve_func=False)
        theirs = load_yaml(up_dir / "mmlu" / "default" / f"mmlu_{subject}.yaml", resolve_func=False)
        assert ours["description"] == theirs["description"], subject

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)

    def requests(task, shots):
        task.set_config(key="num_fewshot", value=shots)
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=4, rank=0, world_size=1)
        return [(i.doc_id, i.idx, i.args) for i in task.instances]

    for ours, (yml, data, extra) in UPSTREAM.items():
        up = load_yaml(up_dir / yml)
        for key in ("tag", "group"):
            up.pop(key, None)
        files = {"validation": str(ds.SHIPPED_DATA / data / "validation.jsonl.gz")}
        up.update(dataset_path="json", dataset_name=None, training_split=None, validation_split=None,
                  test_split="validation", fewshot_split="validation")
        if data == "mmlu":
            files["dev"] = str(ds.SHIPPED_DATA / "mmlu" / "dev.jsonl.gz")
            up.update(fewshot_split="dev", process_docs=getattr(utils, f"mmlu_{extra}"))
        if extra == "boolq":  # upstream reads super_glue/boolq (label), the local file google/boolq (answer)
            up["process_docs"] = lambda d: d.map(lambda doc: {"label": int(doc["answer"])})
        up["dataset_kwargs"] = {"data_files": files}
        theirs = ConfigurableTask(config=up)
        mine = manager.load([ours])["tasks"][ours]
        for shots in (0, 3):
            a, b = requests(mine, shots), requests(theirs, shots)
            assert a and a == b, (ours, shots)
        if ours == "local_mmlu_anatomy":  # few-shot rows are the subject's first dev rows
            import gzip

            dev = [json.loads(l) for l in gzip.open(ds.SHIPPED_DATA / "mmlu" / "dev.jsonl.gz", "rt")]
            first = [r for r in dev if r["subject"] == "anatomy"][:3]
            assert all(r["question"].strip() in a[0][2][0] for r in first)


# ------------------------------------------------------------------------------------------------
# scoring through lm-eval
# ------------------------------------------------------------------------------------------------
def test_every_local_task_scores(model, tokenizer, tmp_path):
    tasks = [t for t in ds.LOCAL_TASKS if t != "local_mmlu"] + ["local_mmlu_anatomy", "local_arc_challenge:2",
                                                                "lambada_openai"]
    res = ds.run_downstream(model, tokenizer, tasks=tasks, limit=2, batch_size=8, device="cpu",
                            output_path=tmp_path / "out.json")
    assert set(res["results"]) == {s.key for s in ds.parse_task_specs(tasks)} - {"lambada_openai|0"}
    for key, r in res["results"].items():
        assert 0.0 <= r["acc"] <= 1.0 and r["n_samples"] == 2, key
        assert key in res["task_configs"]
    assert res["results"]["local_hellaswag|0"]["acc_norm"] is not None
    assert res["results"]["local_arc_challenge|2"]["num_fewshot"] == 2
    assert "lambada_openai|0" in res["skipped"] and "OFFLINE" in res["skipped"]["lambada_openai|0"]
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["lm_eval_version"] == res["lm_eval_version"] and saved["results"] == res["results"]
    cfg = saved["task_configs"]["local_arc_challenge|2"]["local_arc_challenge"]
    assert cfg["num_fewshot"] == 2 and cfg["doc_to_text"] == "Question: {{question}}\nAnswer:"


def test_mmlu_group_aggregates():
    """The 57-subject group (1-shot: each subject's first dev row) through lm-eval, with a stand-in LM
    (the model's cost is not the point here)."""
    from lm_eval.api.model import LM

    class StandIn(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return [(-float(len(r.args[1])), False) for r in requests]  # shortest continuation wins

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    res = ds.run_downstream(StandIn(), tasks=["local_mmlu:1"], limit=1)
    r = res["results"]["local_mmlu|1"]
    assert r["n_samples"] == 57 and len(r["subtasks"]) == 57
    assert r["acc"] == pytest.approx(sum(s["acc"] for s in r["subtasks"].values()) / 57)  # size-weighted (1 each)


def test_in_process_matches_lm_eval_hf_path(model, tokenizer, checkpoint, tmp_path):
    """Same numbers, per document, from (a) our in-process HFLM around the model object, (b) our
    run_downstream on the exported directory, (c) lm-eval's own `model="hf"` path on that directory."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = ["local_arc_easy", "local_winogrande", "local_copa"]
    kw = dict(tasks=tasks, limit=4, batch_size=4, device="cpu", log_samples=True)
    model.train()
    ours = ds.run_downstream(model, tokenizer, **kw)
    assert model.training  # put back as it came
    model.eval()
    ours_path = ds.run_downstream(str(checkpoint / "hf"), None, **kw)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={checkpoint / 'hf'},dtype=float32", tasks=tasks, num_fewshot=0,
        limit=4, batch_size=4, device="cpu", log_samples=True,
        task_manager=TaskManager(include_path=str(ds.write_task_dir(None, tmp_path / "t")), include_defaults=False))
    for task in tasks:
        ref = theirs["results"][task]
        for res in (ours, ours_path):
            mine = res["results"][f"{task}|0"]
            for metric in ("acc", "acc_norm"):
                if f"{metric},none" in ref:
                    assert mine[metric] == pytest.approx(ref[f"{metric},none"], abs=1e-12), (task, metric)
            lls = [[r[0] for r in s["filtered_resps"]] for s in res["samples"][f"{task}|0"][task]]
            ref_lls = [[r[0] for r in s["filtered_resps"]] for s in theirs["samples"][task]]
            assert len(lls) == 4 and [len(x) for x in lls] == [len(x) for x in ref_lls]
            flat, ref_flat = sum(lls, []), sum(ref_lls, [])
            assert flat == pytest.approx(ref_flat, abs=1e-4), task


# ------------------------------------------------------------------------------------------------
# Hydra entry
# ------------------------------------------------------------------------------------------------
def _compose(overrides, name="default"):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs" / "eval")):
        return compose(config_name=name, overrides=overrides)


def test_main_writes_json_next_to_checkpoint(checkpoint):
    from eval.main import run

    cfg = _compose([f"checkpoints=[{checkpoint}]", "tasks=[local_copa,local_piqa:1]", "limit=2", "batch_size=4"])
    (res,) = run(cfg)
    out = checkpoint / "eval" / "downstream_custom.json"
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"local_copa|0", "local_piqa|1"}
    assert saved["lm_eval_version"] and saved["task_configs"]["local_piqa|1"]["local_piqa"]["num_fewshot"] == 1
    assert saved["run"]["arch"] == "transformer" and saved["eval_config"]["limit"] == 2
    # the hf dir itself also works, output still goes to the run dir
    cfg = _compose([f"checkpoints=[{checkpoint / 'hf'}]", "tasks=[local_copa]", "limit=1", "preset=mine"])
    run(cfg)
    assert (checkpoint / "eval" / "downstream_mine.json").is_file()


def test_main_perplexity_checked_before_downstream_and_any_corpus(checkpoint, tmp_path, monkeypatch):
    """``perplexity=true`` on an HF directory without a run config stops before any downstream run; with
    ``perplexity_data=FILE`` it scores that corpus per document.
    Mutation: plan the perplexity inside the per-checkpoint loop (after downstream) -> downstream runs, fails."""
    import shutil

    from eval.main import run

    hf_only = tmp_path / "hf_only"
    shutil.copytree(checkpoint / "hf", hf_only)
    base = [f"checkpoints=[{hf_only}]", "tasks=[local_copa]", "limit=1", "perplexity=true"]
    with monkeypatch.context() as m:
        m.setattr(ds, "run_downstream", lambda *a, **k: pytest.fail("downstream ran before the perplexity check"))
        with pytest.raises(ds.ConfigError, match=r"has no run config .*set perplexity_data="):
            run(_compose(base))
        with pytest.raises(ds.ConfigError, match=r"nope.jsonl"):
            run(_compose([*base, f"perplexity_data={tmp_path / 'nope.jsonl'}"]))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "A more perfect union."}) + "\n"
                                      + json.dumps({"text": "Thank you, and good night."}) + "\n")
    (res,) = run(_compose([*base, f"perplexity_data={tmp_path / 'c.jsonl'}", "perplexity_seq_len=16"]))
    saved = json.loads((hf_only / "eval" / "perplexity.json").read_text())
    assert saved["protocol"] == "documents" and saved["loss"] == res["perplexity"]["loss"]
    tok = _gpt2()
    assert saved["tokens"] == sum(len(tok(t)["input_ids"]) + 1 for t in ("A more perfect union.",
                                                                        "Thank you, and good night."))
    assert json.loads((hf_only / "loss_by_position.json").read_text())["protocol"] == "documents"


def test_main_presets_compose():
    from eval.downstream import resolve_tasks

    cfg = _compose(["checkpoints=[x]"], name="paper")
    assert len(cfg.tasks) == 10 and cfg.batch_size == 8
    assert resolve_tasks(_plain(cfg.tasks))[1][0].num_fewshot == 25
    assert _compose(["tasks=paper"]).tasks == "paper"
    assert _compose([], name="smoke").limit == 20


def _plain(x):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(x)


@pytest.mark.parametrize("overrides,needle", [
    (["checkpoints=[/nonexistent/run_x]"], "checkpoints: /nonexistent/run_x: no such directory"),
    (["checkpoints=[CKPT]", "tasks=bogus"], "tasks='bogus' is not a task preset"),
    (["checkpoints=[CKPT]", "data_root=/nonexistent/evaldata"], "data_root=/nonexistent/evaldata"),
    (["checkpoints=[]"], "checkpoints: none given"),
])
def test_main_bad_input_one_line_error(overrides, needle, checkpoint):
    from eval.main import run

    with pytest.raises(ds.ConfigError) as err:
        run(_compose([o.replace("CKPT", str(checkpoint)) for o in overrides]))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_main_cli_error_exit(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "eval.main", f"checkpoints=[{tmp_path / 'missing'}]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    expected = f"eval.main: error: checkpoints: {tmp_path / 'missing'}: no such directory"
    assert proc.stderr.strip().splitlines()[-1] == expected


@pytest.mark.slow
@pytest.mark.parametrize("arch,config", [
    ("mamba2", {"hidden_size": 32, "num_hidden_layers": 2, "head_dim": 16, "state_size": 8, "chunk_size": 8}),
    ("pararnn", {"cell": "gru", "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2}),
])
def test_main_output_is_ours_only(arch, config, tokenizer, tmp_path):
    """``eval.main`` on a run with downstream tasks and perplexity prints our lines only: no lm-eval /
    datasets INFO lines, no progress bars, no transformers "falling back" warnings (issue 14: ~80 lines per
    model before), and for the ParaRNN export (custom code) no "Do you wish to run the custom code?" prompt.
    Mutations: no ``quiet_libraries()`` in ``eval.main.main`` -> lm-eval lines and bars, fails;
    ``load_tokenizer`` without ``trust_remote_code`` -> the prompt (pararnn), fails."""
    from models.registry import build_model

    torch.manual_seed(0)
    run = tmp_path / "run"
    build_model(arch, config, len(tokenizer)).save_pretrained(run / "hf")
    tokenizer.save_pretrained(run / "hf")
    (run / "config.yaml").write_text(f"model:\n  arch: {arch}\ndata:\n  name: sotu\n  seq_len: 32\n"
                                     "  validation_rows: 2\n")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.run([sys.executable, "-m", "eval.main", f"checkpoints=[{run}]", "tasks=smoke", "limit=1",
                           "perplexity=true"], cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "custom code" not in output and "instantiate a model of type" not in output, output[-3000:]
    lines = [l for l in output.splitlines() if l.strip()]
    assert len(lines) <= 8, "\n".join(lines)
    assert "perplexity (packed, sotu)" in proc.stdout and "local_piqa|0" in proc.stdout


def test_pararnn_in_process_matches_exported(tokenizer, tmp_path):
    """ParaRNN through the same interface: in-process HFLM == exported dir loaded with trust_remote_code."""
    from models.registry import build_model

    torch.manual_seed(0)
    model = build_model("pararnn", {"cell": "gru", "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2},
                        len(tokenizer))
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    kw = dict(tasks=["local_copa", "local_winogrande"], limit=2, batch_size=4, log_samples=True)
    a = ds.run_downstream(model, tokenizer, **kw)
    b = ds.run_downstream(str(tmp_path / "hf"), None, **kw)
    for key in ("local_copa|0", "local_winogrande|0"):
        task = key.split("|")[0]

        def lls(r, key=key, task=task):
            return [x[0] for s in r["samples"][key][task] for x in s["filtered_resps"]]
        assert a["results"][key]["acc"] == b["results"][key]["acc"]
        assert lls(a) == pytest.approx(lls(b), abs=1e-4) and len(lls(a)) == 4
