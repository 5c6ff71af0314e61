"""jobs/export.py: the adapter folder, the merged model (logits equal base + adapter), refusals.

The checkpoint is made here in seconds (a two-layer Llama with a tokenizer trained on real NER
sentences, a LoRA adapter with non-zero B), laid out as training writes one, so no run is needed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

from bioray.config import Config, dump, from_dict, to_dict
from bioray.errors import CheckpointError, OutputError
from bioray.export import export_checkpoint

NER_FILE = Path("ner") / "NCBI-disease" / "devel.tsv"


@pytest.fixture(scope="module")
def records(shared_data):
    """Prompt + answer texts of the first real NCBI-disease sentences, as the corpus renders them."""
    from bioray.config import SourceConfig
    from bioray.corpus import sources
    from bioray.corpus.templates import instruction_set, render_prompt

    path = shared_data / NER_FILE
    if not path.is_file():
        pytest.skip(f"{path} not found (the NCBI-disease NER set in ../shared/data)")
    parsed = [r for r in sources.parse_iob(sources.iter_lines(path, 0, path.stat().st_size, 1), typed=False)
              if isinstance(r, sources.Parsed)][:6]
    instruction = instruction_set(SourceConfig(name="ncbi", format="iob", task="ner", entity="disease"))[0]
    return [render_prompt(Config().corpus.template, instruction, r.input) + r.output for r in parsed]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, records):
    """A base folder and a checkpoint folder for it, as bioray.train writes them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from bioray.model import _train_tokenizer

    root = tmp_path_factory.mktemp("export")
    base_dir, ckpt = root / "base", root / "checkpoints" / "step-000040"
    tok = _train_tokenizer(records, 400)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )).save_pretrained(base_dir, safe_serialization=True)
    tok.save_pretrained(base_dir)
    # init_lora_weights=False: B is random, not zero, so the adapter changes the logits.
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"],
                      task_type="CAUSAL_LM", init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora)
    model.save_pretrained(ckpt, safe_serialization=True)
    tok.save_pretrained(ckpt)
    d = to_dict(Config())
    d["run"]["dir"] = str(root)
    (ckpt / "bioray.yaml").write_text(dump(from_dict(d)))  # model.name_or_path: tiny, as the quickstart
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 40, "first_loss": 3.0}))
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    return base_dir, ckpt


def _encode(path, records):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok(records, return_tensors="pt", padding=True)


def _peft_logits(base_dir, adapter, records):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)).eval()
    with torch.no_grad():
        return model(**_encode(adapter, records)).logits


def test_adapter_export_is_clean_and_loads_with_peft(checkpoint, records, tmp_path):
    base_dir, ckpt = checkpoint
    out = export_checkpoint(ckpt, tmp_path / "adapter")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "bioray.yaml", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert "trainer_state.json" not in names and not any(n.startswith(".") for n in names)
    assert torch.equal(_peft_logits(base_dir, out, records), _peft_logits(base_dir, ckpt, records))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left behind


def test_merged_model_equals_base_plus_adapter_without_peft(checkpoint, records, tmp_path):
    base_dir, ckpt = checkpoint
    out = export_checkpoint(ckpt, tmp_path / "merged", merge=True, expected_base="tiny")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "bioray.yaml"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] is not None
    # Loaded in a process where importing peft fails: a plain transformers model folder.
    script = (
        "import sys; sys.modules['peft'] = None\n"
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"out = {str(out)!r}\n"
        "tok = AutoTokenizer.from_pretrained(out); tok.pad_token = tok.pad_token or tok.eos_token\n"
        "model = AutoModelForCausalLM.from_pretrained(out).eval()\n"
        f"enc = tok(json.load(open({str(tmp_path / 'records.json')!r})), return_tensors='pt', padding=True)\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(**enc).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    (tmp_path / "records.json").write_text(json.dumps(records))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = torch.load(tmp_path / "logits.pt")
    expected = _peft_logits(base_dir, ckpt, records)
    assert merged.shape == expected.shape
    assert (merged - expected).abs().max().item() < 1e-4


def test_the_adapter_changes_the_logits(checkpoint, records):
    # Guards the test above: equal logits would prove nothing if B were zero.
    from transformers import AutoModelForCausalLM

    base_dir, ckpt = checkpoint
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()(**_encode(base_dir, records)).logits
    assert (plain - _peft_logits(base_dir, ckpt, records)).abs().max().item() > 1e-2


def test_refusals_leave_nothing_behind(checkpoint, tmp_path):
    import shutil

    base_dir, ckpt = checkpoint
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an empty folder"):
        export_checkpoint(ckpt, full)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    with pytest.raises(CheckpointError, match="made for base model"):
        export_checkpoint(ckpt, tmp_path / "a", expected_base="meta-llama/Llama-2-7b-hf")
    export_checkpoint(ckpt, tmp_path / "b", expected_base=str(base_dir))  # its own base passes
    export_checkpoint(ckpt, tmp_path / "c", expected_base="tiny")  # as its bioray.yaml names it
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is missing"):
        export_checkpoint(broken, tmp_path / "d", merge=True, expected_base="tiny")
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no longer exists"):
        export_checkpoint(moved, tmp_path / "e", merge=True, expected_base="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "broken", "c", "full", "moved"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_checkpoint(ckpt, empty) == empty and (empty / "adapter_config.json").is_file()


def _job(*args):
    return subprocess.run([sys.executable, "jobs/export.py", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ})


def test_job_exits_2_with_one_line(checkpoint, tmp_path):
    _, ckpt = checkpoint
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    proc = _job("--checkpoint", ckpt, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"bioray: error: {tmp_path / 'out'}: already exists and is not an empty "
                                        "folder; choose a new --out"]
    proc = _job("--checkpoint", ckpt, "--out", tmp_path / "new", "--set", "model.name_or_path=meta-llama/Llama-2-7b-hf")
    assert proc.returncode == 2 and "made for base model" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "new").exists()
    proc = _job("--checkpoint", ckpt, "--out", tmp_path / "new")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"adapter: {tmp_path / 'new'}" in proc.stdout
