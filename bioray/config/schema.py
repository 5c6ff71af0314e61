"""bioray's config schema: one typed dataclass per section, every default and its meaning.

Defaults live here and nowhere else: each field has its default and, under it, a docstring
(docs/config.md is generated from them by :mod:`bioray.config.docs`). Building a
:class:`Config` checks it (:mod:`bioray.config.validate`); reading YAML, ``--set`` overrides and
the plain-dict form live in :mod:`bioray.config.load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from bioray.config.validate import validate


@dataclass
class RunSection:
    dir: str = "runs/quickstart"
    """Everything a run writes goes under this folder (a local path)."""
    seed: int = 0
    """Seeds instruction draws, mixing, LoRA init and data order."""
    storage: Optional[str] = None
    """Where a run keeps what outlives it (local path, or a URI such as s3://...): checkpoints under <storage>/<run name>/checkpoints/ and the result files beside them; a URI also means no shared filesystem (the base model, corpus and tokenised cache are copied to <storage>/_shared/); null = run.dir/checkpoints/."""
    name: Optional[str] = None
    """This run's folder under run.storage; null = the last part of run.dir (a Tune trial: <search>/trials/<trial id>)."""
    resume: bool = True
    """Continue from the run's latest checkpoint when there is one (its training keys must match); false (the jobs' `--fresh`) starts afresh, moving old checkpoints aside."""
    quiet: bool = False
    """Silence progress lines (the jobs' `--quiet` sets it)."""


@dataclass
class SourceConfig:
    name: str = ""
    """Unique source name; mixture weights, reports and record ids key on it."""
    format: str = "iob"
    """Record layout: iob | re_masked | nli | multilabel | instructions | messages (chat records: OpenAI `messages` or ShareGPT `conversations`; the last assistant turn is the answer)."""
    task: str = "ner"
    """ner | re | nli | cls | qa: decides the answer parser and the metric."""
    files: dict[str, str] = field(default_factory=dict)
    """Split name (train/validation/test) -> file path (relative to the working directory); `${BIORAY_DATA}`
    stands for the data root (`bioray data fetch` writes there; default ~/.local/share/bioray)."""
    dataset: Optional[str] = None
    """Instead of files: a Hugging Face `datasets` source: a folder written by save_to_disk, a folder of data files (json/jsonl/csv/parquet, read by load_dataset), or a hub name; needs splits."""
    subset: Optional[str] = None
    """dataset only: the hub dataset's configuration (load_dataset's second argument); null = its default."""
    splits: Optional[dict[str, str]] = None
    """dataset only: bioray split (train/validation/test) -> the dataset's split name, e.g. {train: train, validation: dev}; a saved single Dataset is split `train`."""
    columns: Optional[dict[str, str]] = None
    """Row layouts (JSON lines, Parquet, datasets): the format's field -> the column that holds it, e.g. {input: question, output: answer}; null = the fields' own names. Fields: iob (dataset only) tokens, tags; re_masked sentence, label; nli sentence1, sentence2, gold_label; multilabel text, labels; instructions instruction, input, output; messages messages."""
    entity: Optional[str] = None
    """iob only: what the instruction asks the model to tag (e.g. disease)."""
    typed: bool = False
    """iob only: keep entity types in the answer tags (B-protein) instead of plain B/I/O."""
    labels: Optional[dict[Any, str]] = None
    """re_masked/multilabel: raw label -> answer word. Keys match the raw label's text."""
    negative_label: Optional[str] = None
    """re_masked: the answer word that RE f1 leaves out (e.g. false)."""
    none_label: str = "none"
    """multilabel: the answer when a text has no label."""
    instructions: Optional[list[str]] = None
    """Paraphrased instructions to draw from; null = bioray's own set for the task."""
    reference: Optional[dict[str, Any]] = None
    """Published scores to print beside ours, e.g. {metric: f1, paper_13b: 85.69} (percent)."""

    def split_names(self) -> list[str]:
        """The bioray splits this source has: its files' keys, or its dataset's ``splits`` keys."""
        return list(self.splits or {}) if self.dataset is not None else list(self.files)


@dataclass
class CorpusSection:
    sources: list[SourceConfig] = field(default_factory=list)
    """One entry per source dataset."""
    sample_dir: Optional[str] = None
    """If set, bioray first writes its synthetic sample files (iob/re/nli) into this folder."""
    template: str = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Output:\n"
    """Prompt layout, holding {instruction} and {input}; the answer follows it directly. Default: the paper's layout. `chat`: the tokenizer's own chat template (user turn = instruction, blank line, input; loss on the answer and the end-of-turn token); needs a model whose tokenizer has one (not tiny)."""
    system_prompt: Optional[str] = None
    """template chat only: a system turn before each record's user turn; null = none (some templates, Gemma's, refuse one)."""
    max_rejected_fraction: float = 0.001
    """Fail the build when more than this share of lines is rejected (0 = any rejection)."""
    shard_mib: int = 64
    """In-memory MiB of records gathered into one Parquet shard of run.dir/corpus/ (smaller on disk)."""
    max_line_bytes: int = 1048576
    """Longest line a source file may hold (bytes, 1 MiB); a longer one is rejected unread, far beyond any data.max_seq_len."""


@dataclass
class TinyModelSection:
    vocab_size: int = 2048
    """BPE vocabulary trained on the corpus."""
    hidden_size: int = 256
    """Model width."""
    num_layers: int = 4
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    pretrain_on: str = "inputs"
    """Train-split text pretraining reads: inputs (each record's input text) | twice (each input, a line break, the same input again: the second copy can only be predicted by copying, which grows the base the copying head an NER answer needs) | prompts (instruction and input laid out by corpus.template) | records (prompt and answer). The tokenizer reads the prompts (the records with records). inputs, twice and prompts never show an answer, so scores measure what fine-tuning taught; with records the base already does the task."""
    pre_tokenizer: str = "bytelevel"
    """How the tokenizer splits text before BPE: bytelevel (GPT-2's: the space before a word is part of it, so a word at a line's start is other tokens) | words (letters, digits, symbols and white space apart: a word is the same tokens wherever it stands, which NER answers, one word per line, need when the base never saw an answer; 21% more tokens on the real corpora) | trailing_space (as words, with the space after a word part of it: the same property at 25% fewer tokens than words; what configs/ner-real.yaml uses)."""
    pretrain_packing: str = "isolated"
    """How pretraining's 256-token rows hold its texts: isolated (each text attends to itself only, positions restarting at 0, as data.packing does for fine-tuning) | concatenated (texts run together and attend across each other; bases before 2026-12-03, and configs/ner-real.yaml, whose measurements were made with it). On a small vocabulary a word recurs in every text of a row, so a copying head cannot tell which earlier occurrence to copy from unless the texts are isolated."""
    pretrain_steps: int = 500
    """Full-parameter causal-LM steps on the corpus text before LoRA (random bases learn nothing)."""
    pretrain_batch_size: int = 8
    """Sequences (of 256 tokens) per pretraining step."""
    pretrain_lr: float = 2.0e-3
    """Peak learning rate of pretraining."""


@dataclass
class ModelSection:
    name_or_path: str = "tiny"
    """`tiny` (built and cached locally), a hub id, or a local Hugging Face folder."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model (from_pretrained's trust_remote_code); off unless you trust it. Evaluate and export take it from your config or command line, never from a checkpoint."""
    allow_pickle: bool = False
    """Load pickle weights (*.bin, *.pt) from a model folder without safetensors; pickle can run code when loaded, so only for files you trust."""
    revision: Optional[str] = None
    """Hub revision of model.name_or_path (branch, tag or commit hash; pin a commit for a reproducible base); null = the default branch. Kept in each checkpoint's bioray.yaml."""
    tiny: TinyModelSection = field(default_factory=TinyModelSection)
    """Shape and pretraining of the `tiny` base."""
    attn_implementation: Optional[str] = None
    """Attention kernel for from_pretrained: sdpa, eager, flash_attention_2, flex_attention; null = transformers' choice."""


@dataclass
class DataSection:
    max_seq_len: int = 512
    """Longest tokenised example (prompt + answer + EOS) and packed sequence length."""
    packing: bool = True
    """Pack several examples per sequence; each attends only within itself."""
    overlong: str = "drop"
    """Examples longer than max_seq_len: drop (counted in the cache's meta.json) | truncate (cuts the prompt, never the answer) | error (exit 2 naming the first one)."""
    cache_dir: Optional[str] = None
    """Tokenised cache and built tiny models; null = ~/.cache/bioray (or $BIORAY_CACHE)."""
    tokenise_batch_size: int = 2048
    """Records per tokenising task (corpus row groups are grouped up to about this many)."""
    tokenise_tasks: Optional[int] = None
    """Most tokenising tasks at once; null = as many as the cluster's CPUs allow."""
    tokenise_cpus: float = 1.0
    """Logical CPUs per tokenising task (each task reads, tokenises and writes one block)."""


@dataclass
class TrainSection:
    num_workers: int = 2
    """Ray Train workers (one per GPU on a GPU cluster)."""
    use_gpu: bool = False
    """Train on GPUs (NCCL, bf16); false = CPU (gloo, fp32)."""
    cpus_per_worker: float = 0.5
    """Logical CPUs reserved per worker; fractions leave room for Ray Data and scorers."""
    max_steps: int = 200
    """Optimizer steps per worker (unless train.epochs is set)."""
    epochs: Optional[float] = None
    """Passes over the mixed, packed epoch instead of max_steps: steps = ceil(epochs x micro-batches per rank per epoch / grad_accum); null = train.max_steps."""
    lr: float = 2.0e-4
    """Peak learning rate (linear warmup, cosine decay to 10%)."""
    lr_scheduler: str = "cosine_floor"
    """cosine_floor (bioray's: warmup from 1/warmup_steps of the peak, cosine to 10%) or a transformers scheduler: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, cosine_with_min_lr (to 10%)."""
    optimizer: str = "AdamW"
    """A torch.optim optimizer by class name (AdamW, Adam, SGD, RMSprop, ...); with train.offload, DeepSpeed's CPU Adam."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 (GPU only, loss-scaled by DeepSpeed) | fp32."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clip (0 = off)."""
    micro_batch_size: int = 4
    """Sequences per worker per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    offload: bool = False
    """ZeRO optimizer (and, at stage 3, parameter) offload to CPU memory."""
    full_finetune: bool = False
    """Train every weight instead of a LoRA adapter (the paper's setting)."""
    report_every: int = 20
    """Steps between metric reports (a report costs about a second)."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 = only at the end."""
    keep_checkpoints: int = 2
    """Best checkpoints kept by eval score."""
    max_failures: int = 3
    """Worker-group failures (a lost node, a preempted GPU) Ray Train recovers from, resuming exactly at the latest checkpoint; -1 = no limit."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""


@dataclass
class LoraSection:
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA alpha (scale = alpha / rank)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get adapters."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained whole beside the adapters and saved in the checkpoint's adapter file (peft's modules_to_save), e.g. [embed_tokens]: the embedding of a base that never saw the answers' tokens (a tiny base pretrained on the inputs only, or new special tokens), which LoRA on the linear layers cannot move. A tied output head is trained with it."""


@dataclass
class MixtureSection:
    weights: dict[str, float] = field(default_factory=dict)
    """Per source (or task, with by: task) weight; missing ones weigh 1.0; 0 drops it."""
    by: str = "source"
    """source | task: what the weights key on."""
    replacement: bool = False
    """Draw with replacement (small sources repeat) or without (an epoch ends when one runs out)."""
    epoch_size: Optional[int] = None
    """Records one mixed epoch draws; null = as many as the weights allow without replacement."""

    def weight(self, key: str) -> float:
        """The weight of a source name (or of a task name, with ``by: task``).

        Args:
            key: A source name, or a task name when ``by`` is ``task``.

        Returns:
            Its weight in ``weights``; 1.0 when it has none (every source weighs the same
            unless told otherwise).
        """
        return self.weights.get(key, 1.0)


@dataclass
class EvalSection:
    split: str = "validation"
    """Split of each source that is scored."""
    max_examples: Optional[int] = 64
    """Examples per source; null = all."""
    decoding: str = "free"
    """free (greedy/beam text, parsed afterwards: the paper) | constrained (answers always parse)."""
    batch_size: int = 32
    """Examples per generation batch."""
    num_beams: int = 1
    """Beam width for free decoding (the paper: 4)."""
    max_new_tokens: Optional[int] = None
    """Answer length cap; null = from the longest reference answer."""
    num_actors: int = 1
    """Scorer actors in the evaluation pool."""
    cpus_per_actor: float = 1.0
    """Logical CPUs per scorer actor."""
    gpus_per_actor: float = 0.0
    """GPUs per scorer actor (fractions share a GPU)."""
    score: str = "mean"
    """Checkpoint score: mean (of each source's primary metric) or SOURCE/METRIC."""


@dataclass
class TuneSection:
    num_samples: int = 4
    """Trials in the search."""
    max_concurrent_trials: Optional[int] = None
    """Trials at once; null = as many as the cluster's CPUs (GPUs) fit beside the scorer pool."""
    scheduler: str = "asha"
    """asha (stops trials that score low at a checkpoint, on the task score) | fifo (every trial runs to the end)."""
    search: str = "random"
    """random | optuna (model-based; needs the optuna package)."""
    lr: Optional[list[float]] = field(default_factory=lambda: [1.0e-4, 1.0e-2])
    """[low, high] of train.lr, sampled log-uniformly; null = not searched."""
    rank: Optional[list[int]] = field(default_factory=lambda: [4, 8, 16])
    """lora.rank choices; null = not searched."""
    mixture: bool = True
    """Search mixture.weights: one point on the simplex per trial (per-source factors, normalised)."""
    mixture_low: float = 0.2
    """Lowest factor a source can draw before normalising (0 lets a trial all but drop a source)."""
    space: dict[str, Any] = field(default_factory=dict)
    """Any other train.*, lora.*, mixture.* key or data.packing, by dotted name (the rest is built once per
    search): {choice: [...]} | {uniform: [low, high]} | {loguniform: [low, high]}."""
    grace_steps: Optional[int] = None
    """ASHA: steps before a trial can be stopped; null = two checkpoints (2 x train.checkpoint_every)."""
    reduction_factor: int = 2
    """ASHA: keep the top 1/reduction_factor at each rung."""
    trial_cpus: float = 0.1
    """Logical CPUs of each trial's own process (its training workers are scheduled beside it)."""


@dataclass
class MlflowSection:
    enabled: bool = False
    """Log each run (each Tune trial) to MLflow: the flattened config, every report and checkpoint score, the best checkpoint. Needs `pip install 'bioray[mlflow]'`."""
    tracking_uri: Optional[str] = None
    """http(s)://server, databricks, sqlite:///FILE (the full mlflow package) or file:FOLDER (with MLFLOW_ALLOW_FILE_STORE=true); null = $MLFLOW_TRACKING_URI, else MLflow's default. No credentials here: MLFLOW_TRACKING_TOKEN (or _USERNAME/_PASSWORD) stay in the environment."""
    experiment: str = "bioray"
    """MLflow experiment the runs go to (created if missing)."""


@dataclass
class WandbSection:
    enabled: bool = False
    """Log each run (each Tune trial) to Weights & Biases, as track.mlflow does. Needs `pip install 'bioray[wandb]'`."""
    project: Optional[str] = None
    """W&B project; null = $WANDB_PROJECT, else bioray."""
    entity: Optional[str] = None
    """W&B team or user; null = the API key's default entity."""
    mode: str = "online"
    """online (needs WANDB_API_KEY in the environment or `wandb login`) | offline (files under $WANDB_DIR, else run.dir/wandb/; `wandb sync` uploads them later)."""


@dataclass
class TrackSection:
    mlflow: MlflowSection = field(default_factory=MlflowSection)
    """MLflow tracking."""
    wandb: WandbSection = field(default_factory=WandbSection)
    """Weights & Biases tracking."""


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    corpus: CorpusSection = field(default_factory=CorpusSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    mixture: MixtureSection = field(default_factory=MixtureSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tune: TuneSection = field(default_factory=TuneSection)
    """Ray Tune search (jobs/tune.py); unused by finetune."""
    track: TrackSection = field(default_factory=TrackSection)
    """Experiment trackers (MLflow, Weights & Biases); off unless enabled."""

    def __post_init__(self) -> None:
        validate(self)

    def source_weight(self, source_name: str) -> float:
        """The mixture weight that applies to a source: its own, or its task's with ``mixture.by: task``.

        Args:
            source_name: A name from ``corpus.sources``.

        Returns:
            The weight (1.0 where ``mixture.weights`` leaves it out).

        Raises:
            KeyError: no source of that name in ``corpus.sources``.
        """
        source = next((s for s in self.corpus.sources if s.name == source_name), None)
        if source is None:
            raise KeyError(f"no source named {source_name!r} in corpus.sources")
        return self.mixture.weight(source.task if self.mixture.by == "task" else source.name)
