"""Train ``sclstore-tiny``: a small Tahoe-X1 on scanpy's bundled ``pbmc68k_reduced``.

Run (a few minutes of CPU on one thread; bit-identical weights for a given seed, torch build and
thread count; the exact command, time and resulting geometry are in the folder's README)::

    python -m sclstore.ingest.models.train_tiny --steps 600 --seed 0 --threads 1

(``--out DIR`` writes elsewhere; the default is the packaged ``sclstore-tiny/`` folder.)

Data: the 700 cells x 765 genes of ``scanpy.datasets.pbmc68k_reduced()`` (shipped inside the
scanpy wheel); raw counts recovered as ``rint(expm1(raw.X) * obs.n_counts / 1e4)``; 600 cells
train, 100 held out. Each step splits every cell of the batch into two views (disjoint random
gene subsets, :func:`split_views`). Objective: the official Tahoe-X1 pretraining loss with a
generative mask (``research/models.md`` §1: hide the binned values of 15 % of the gene tokens,
value -1 plus the flag embedding, hidden tokens attend only to visible ones and themselves,
predict their bins with ``expression_decoder`` and ``mvc_decoder``), plus NT-Xent between the
two views and an isotropy penalty on the pooled embeddings of every stored layer and pool
(:func:`contrastive_loss`), after a data-dependent centring of the output biases
(:func:`centre_biases`). Without the last three, the stored layers collapse onto one direction.
The output folder is a Tahoe-X1 HF-layout checkpoint (``model.safetensors`` with ``model.``
prefixed keys, decoder heads included), plus ``training.json`` and ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..adapter import TokenRecord
from .tahoe.data import TahoeTokenizer, collate_records
from .tahoe.model import TahoeConfig, TahoeModel, TXBlock, resolve_activation
from .tiny_card import checkpoint_geometry, load_pbmc_counts, render_readme

__all__ = [
    "TahoePretrainModel",
    "centre_biases",
    "contrastive_loss",
    "evaluate",
    "evaluate_checkpoint",
    "load_pbmc_counts",
    "main",
    "masked_batch",
    "model_configs",
    "nt_xent",
    "split_views",
    "train",
]

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "sclstore-tiny"
N_VAL = 100
MASK_VALUE = -1.0
MLM_PROBABILITY = 0.15
VIEW_MAX_GENES = 128
OFFSET_WEIGHT = 2.0
PR_WEIGHT = 32.0
LOSS_POOLS = ("cls", "mean")  # the pools sclstore stores by default for this family


def model_configs(
    vocab_size: int, pad_token_id: int, *, d_model: int, n_layers: int, n_heads: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model_config.yml`` and ``collator_config.yml`` contents, with the official key names."""
    model_cfg: dict[str, Any] = {
        "name": "tahoe_x1",
        "d_model": d_model,
        "n_layers": n_layers,
        "init_device": "cpu",
        "expansion_ratio": 4,
        "standard_scale_outputs": False,
        "transformer_activation": "relu",
        "n_heads": n_heads,
        "norm_scheme": "pre",
        "use_generative_training": False,
        "use_glu": False,
        "cell_emb_style": "cls",
        "attn_config": {
            "attn_impl": "flash",
            "attn_type": "grouped_query_attention",
            "attn_pdrop": 0.0,
            "use_attn_mask": False,
        },
        "norm_config": {"norm_type": "layernorm", "eps": 1.0e-5},
        "expression_encoder": {
            "input_emb_style": "continuous",
            "dropout": 0.1,
            "max_value": 512,
            "activation": "relu",
            "use_norm": True,
        },
        "gene_encoder": {"use_norm": True},
        "mvc": {"arch_style": "inner product", "query_activation": "sigmoid", "scaled_dot_product": True},
        "expression_decoder": {"n_outputs": 1, "n_layers": 1, "activation": "leaky_relu"},
        "vocab_size": vocab_size,
        "precision": "amp_bf16",
    }
    collator_cfg: dict[str, Any] = {
        "do_padding": True,
        "pad_value": -2,
        "do_mlm": True,
        "do_binning": True,
        "mlm_probability": MLM_PROBABILITY,
        "mask_value": MASK_VALUE,
        "max_length": 1024,
        "sampling": True,
        "num_bins": 51,
        "right_binning": False,
        "keep_first_n_tokens": 1,
        "use_junk_tokens": False,
        "pad_token_id": pad_token_id,
    }
    return model_cfg, collator_cfg


class TahoePretrainModel(TahoeModel):
    """The encoder plus the official pretraining heads ``expression_decoder`` and ``mvc_decoder``.

    Parameter names equal upstream ``TXModel`` (``expression_decoder.linear_layers.{j}``,
    ``expression_decoder.out_proj``, ``mvc_decoder.gene2query``, ``mvc_decoder.W``).
    """

    def __init__(self, cfg: TahoeConfig, *, decoder_layers: int = 1) -> None:
        super().__init__(cfg)
        d = cfg.d_model
        self.expression_decoder = nn.Module()
        self.expression_decoder.linear_layers = nn.ModuleList([nn.Linear(d, d) for _ in range(decoder_layers)])
        self.expression_decoder.out_proj = nn.Linear(d, 1)
        self.mvc_decoder = nn.Module()
        self.mvc_decoder.gene2query = nn.Linear(d, d)
        self.mvc_decoder.W = nn.Linear(d, d, bias=False)
        self._leaky = resolve_activation("leaky_relu")

    def predict(
        self, gene_ids: torch.Tensor, values: torch.Tensor, attn_mask: torch.Tensor, gen_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the expression-decoder and MVC predictions ``(B, S)`` of the bins."""
        return self.heads(self(gene_ids, values, attn_mask, gen_mask=gen_mask), gene_ids)

    def states(
        self, gene_ids: torch.Tensor, values: torch.Tensor, attn_mask: torch.Tensor, gen_mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """The residual stream at every stored layer: ``[input of block 0, output of block 0, ...]``."""
        x = self.embed_tokens(gene_ids, values, gen_mask)
        out = [x]
        for block in self.blocks:
            x = block(x, attn_mask)
            out.append(x)
        return out

    def heads(self, hidden: torch.Tensor, gene_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two pretraining heads on the last residual stream (before the final norm)."""
        out = self.final_norm(hidden)
        x = out
        for layer in self.expression_decoder.linear_layers:  # type: ignore[union-attr]  # nn.Module __getattr__ typing
            x = self._leaky(layer(x))
        expr = self.expression_decoder.out_proj(x).squeeze(-1)  # type: ignore[operator]  # nn.Module __getattr__ typing
        query = torch.sigmoid(self.mvc_decoder.gene2query(self.gene_encoder(gene_ids)))  # type: ignore[operator]  # nn.Module __getattr__ typing
        mvc = torch.bmm(self.mvc_decoder.W(query), out[:, 0, :].unsqueeze(2)).squeeze(2) / math.sqrt(query.shape[-1])  # type: ignore[operator]  # nn.Module __getattr__ typing
        return expr, mvc


def masked_batch(
    records: list[TokenRecord], *, pad_token_id: int, pad_value: float, rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    """Collate records and hide ``int(0.15 * n_genes)`` random gene values per cell (upstream ``_create_random_mask``).

    Returns the input tensors, the generative attention mask (unmasked tokens attend to unmasked
    ones; masked tokens to unmasked ones and themselves; never to padding), and the targets.
    """
    batch = collate_records(records, pad_token_id=pad_token_id, pad_value=pad_value, n_special=1)
    gen_mask = torch.zeros_like(batch.padding_mask)
    for i, rec in enumerate(records):
        n_valid = len(rec) - 1
        n_mask = int(n_valid * MLM_PROBABILITY)
        if n_mask:
            gen_mask[i, 1 + torch.from_numpy(rng.permutation(n_valid)[:n_mask])] = True
    s = gen_mask.shape[1]
    allowed = (~gen_mask).unsqueeze(1) | (gen_mask.unsqueeze(2) & torch.eye(s, dtype=torch.bool))
    attn = (allowed & batch.padding_mask[:, None, :]).unsqueeze(1)
    return {
        "gene_ids": batch.gene_ids,
        "values": batch.values.masked_fill(gen_mask, MASK_VALUE),
        "target": batch.values,
        "gen_mask": gen_mask,
        "attn_mask": attn,
        "padding_mask": batch.padding_mask,
    }


def _tokenize_all(
    cfg: TahoeConfig, vocab: dict[str, int], genes: list[str], counts: scipy.sparse.csr_matrix, *, seed: int
) -> list[TokenRecord]:
    tok = TahoeTokenizer(
        cls_id=vocab["<cls>"],
        pad_token_id=cfg.pad_token_id,
        pad_value=cfg.pad_value,
        num_bins=cfg.num_bins,
        right_binning=cfg.right_binning,
        keep_first_n_tokens=1,
        max_length=1024,
        token_ids=np.asarray([vocab[g] for g in genes], dtype=np.int64),
    )
    return tok.tokenize(counts, np.arange(counts.shape[0]), seed=seed)


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    return F.mse_loss(pred * m, target * m, reduction="sum") / m.sum()


def split_views(records: list[TokenRecord], rng: np.random.Generator, *, max_genes: int = 128) -> list[TokenRecord]:
    """Two views of every cell: disjoint random sets of at most ``max_genes`` of its gene tokens
    (at most half each), ``<cls>`` kept in both.

    Returns the first views of all cells, then the second views (``2 * len(records)`` records).
    The values stay the cell's bins, so a view is what the model would see of a cell measured
    on a random subset of its genes.
    """
    first: list[TokenRecord] = []
    second: list[TokenRecord] = []
    for rec in records:
        perm = 1 + rng.permutation(len(rec) - 1)
        half = min(perm.size // 2, max_genes)
        for dst, idx in ((first, perm[:half]), (second, perm[half : 2 * half])):
            keep = np.concatenate([[0], np.sort(idx)])
            dst.append(TokenRecord(rec.cell_idx, rec.gene_ids[keep], rec.values[keep]))
    return first + second


def pool_states(hidden: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """``cls`` (position 0), ``mean`` and ``max`` over the ``tokens`` positions, as the ingest pools them."""
    m = tokens.unsqueeze(-1)
    mean = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    top = hidden.masked_fill(~m, float("-inf")).amax(dim=1)
    return {"cls": hidden[:, 0], "mean": mean, "max": top}


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss for ``z = [view 1 of n cells; view 2 of the same n cells]`` (cosine similarity)."""
    n = z.shape[0] // 2
    u = F.normalize(z, dim=1)
    sim = (u @ u.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def isotropy_penalty(z: torch.Tensor, *, offset_weight: float = OFFSET_WEIGHT, pr_weight: float = PR_WEIGHT) -> torch.Tensor:
    """``offset_weight * |mean z|² / mean |z|²`` (the share of the second moment in the common offset,
    which drives the mean cosine of cell pairs) plus ``pr_weight / participation ratio`` of the batch
    covariance (a batch of 64 views overstates the participation ratio of the whole data, hence the weight)."""
    offset = z.mean(dim=0).pow(2).sum() / z.pow(2).sum(dim=1).mean().clamp_min(1e-12)
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / (z.shape[0] - 1)
    return offset_weight * offset + pr_weight * cov.pow(2).sum() / torch.diagonal(cov).sum().pow(2).clamp_min(1e-12)


def contrastive_loss(
    states: list[torch.Tensor], b: dict[str, torch.Tensor], *, temperature: float, offset_weight: float = OFFSET_WEIGHT,
    pr_weight: float = PR_WEIGHT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NT-Xent and mean :func:`isotropy_penalty` over every layer and stored pool (:data:`LOSS_POOLS`).

    ``cls`` counts from layer 1 (layer 0's ``<cls>`` is one fixed vector for every cell). Pools
    run over the visible gene tokens only: with the generative mask they never attend to hidden
    ones, so these are exactly the embeddings inference computes for the visible genes.
    """
    tokens = b["padding_mask"] & ~b["gen_mask"]
    tokens[:, 0] = False
    con, iso = [], []
    for layer, h in enumerate(states):
        for pool, z in pool_states(h, tokens).items():
            if pool not in LOSS_POOLS or (pool == "cls" and layer == 0):
                continue
            con.append(nt_xent(z, temperature))
            iso.append(isotropy_penalty(z, offset_weight=offset_weight, pr_weight=pr_weight))
    return torch.stack(con).mean(), torch.stack(iso).mean()


@torch.no_grad()
def centre_biases(model: TahoePretrainModel, records: list[TokenRecord], *, pad_token_id: int, pad_value: float) -> None:
    """Data-dependent initialisation: shift the encoders' and blocks' output biases so that, over the
    gene tokens of ``records``, the residual stream has zero mean at every layer.

    A freshly initialised model puts a large common offset into every token (the value encoder
    sees the same bins in every cell), which makes every cell's embedding point the same way;
    gradient steps of size ``lr`` take hundreds of steps to remove it. Only biases change.
    """
    model.eval()
    b = collate_records(records, pad_token_id=pad_token_id, pad_value=pad_value, n_special=1)
    genes = b.gene_mask

    def mean_over_genes(x: torch.Tensor) -> torch.Tensor:
        return x[genes].mean(dim=0)

    enc = model.expression_encoder
    enc.norm.bias -= mean_over_genes(enc(b.values))  # type: ignore[union-attr, operator]  # norm exists (use_norm)
    model.gene_encoder.enc_norm.bias -= mean_over_genes(model.gene_encoder(b.gene_ids))  # type: ignore[union-attr, operator]
    x = model.embed_tokens(b.gene_ids, b.values)
    attn = b.padding_mask[:, None, None, :]
    for block in cast("list[TXBlock]", list(model.blocks)):
        a = block.self_attn(block.norm1(x), attn)
        block.self_attn.out_proj.bias.sub_(mean_over_genes(a))
        x = x + block.self_attn(block.norm1(x), attn)
        f = block._ff(block.norm2(x))
        block.down_proj.bias.sub_(mean_over_genes(f))
        x = x + block._ff(block.norm2(x))
    model.train()


@torch.no_grad()
def evaluate(
    model: TahoePretrainModel,
    records: list[TokenRecord],
    train_records: list[TokenRecord],
    *,
    seed: int,
    pad_token_id: int,
) -> dict[str, float]:
    """Masked-bin MSE of the decoders on held-out cells, against two trivial baselines.

    Baselines: the mean masked bin of the training cells (``mean_bin``), and each gene's mean
    bin over the training cells (``gene_mean_bin``; the global mean for unseen genes).
    """
    model.eval()
    rng = np.random.default_rng(seed)
    sums = {"expr": 0.0, "mvc": 0.0, "mean_bin": 0.0, "gene_mean_bin": 0.0}
    n = 0
    genes = np.concatenate([r.gene_ids[1:] for r in train_records])
    vals = np.concatenate([r.values[1:] for r in train_records]).astype(np.float64)
    global_mean = float(vals.mean())
    size = int(max(genes.max(), max(int(r.gene_ids.max()) for r in records)) + 1)
    gene_sum = np.bincount(genes, weights=vals, minlength=size)
    gene_cnt = np.bincount(genes, minlength=size)
    gene_mean = torch.from_numpy(np.where(gene_cnt > 0, gene_sum / np.maximum(gene_cnt, 1), global_mean)).float()
    for start in range(0, len(records), 32):
        b = masked_batch(records[start : start + 32], pad_token_id=pad_token_id, pad_value=-2.0, rng=rng)
        expr, mvc = model.predict(b["gene_ids"], b["values"], b["attn_mask"], b["gen_mask"])
        m, t = b["gen_mask"], b["target"]
        k = int(m.sum())
        sums["expr"] += float(((expr - t)[m] ** 2).sum())
        sums["mvc"] += float(((mvc - t)[m] ** 2).sum())
        sums["mean_bin"] += float(((global_mean - t)[m] ** 2).sum())
        sums["gene_mean_bin"] += float(((gene_mean[b["gene_ids"]] - t)[m] ** 2).sum())
        n += k
    return {f"mse_{k}": v / n for k, v in sums.items()} | {"n_masked": n}


def train(out: Path, *, steps: int = 600, seed: int = 0, d_model: int = 64, n_layers: int = 6, n_heads: int = 4,
          batch_size: int = 32, lr: float = 3e-3, threads: int = 1, contrastive_weight: float = 1.0,
          temperature: float = 0.2, offset_weight: float = OFFSET_WEIGHT, pr_weight: float = PR_WEIGHT,
          view_genes: int = VIEW_MAX_GENES) -> dict[str, Any]:
    """Train sclstore-tiny and write the checkpoint folder; return the recorded metrics.

    Each step takes ``batch_size`` cells, splits each into two views (disjoint halves of its
    genes, :func:`split_views`), hides 15 % of each view's values and minimises
    ``masked MSE / var(bins) + contrastive_weight * NT-Xent`` (:func:`contrastive_loss` over the
    pooled embeddings of every layer and pool; ``temperature`` is its softmax temperature).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    counts, genes = load_pbmc_counts()
    vocab = {g: i for i, g in enumerate(genes)}
    for tok in ("<pad>", "<cls>", "<eoc>"):
        vocab[tok] = len(vocab)
    model_cfg, collator_cfg = model_configs(
        len(vocab), vocab["<pad>"], d_model=d_model, n_layers=n_layers, n_heads=n_heads
    )
    cfg = TahoeConfig.from_dicts(model_cfg, collator_cfg)
    records = _tokenize_all(cfg, vocab, genes, counts, seed=seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    val = [records[i] for i in sorted(order[:N_VAL])]
    tr = [records[i] for i in sorted(order[N_VAL:])]
    model = TahoePretrainModel(cfg)
    centre_biases(model, [tr[i] for i in rng.choice(len(tr), size=128, replace=False)], pad_token_id=cfg.pad_token_id,
                  pad_value=cfg.pad_value)
    with torch.no_grad():  # start the bin regressor at the mean training bin instead of 0
        model.expression_decoder.out_proj.bias.fill_(float(np.concatenate([r.values[1:] for r in tr]).mean()))  # type: ignore[union-attr, operator]  # nn.Module __getattr__ typing
    bin_var = float(np.concatenate([r.values[1:] for r in tr]).astype(np.float64).var())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=1e-5)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    history: list[dict[str, float]] = []
    before = evaluate(model, val, tr, seed=seed + 1, pad_token_id=cfg.pad_token_id)
    model.train()
    for step in range(1, steps + 1):
        idx = rng.choice(len(tr), size=batch_size, replace=False)
        views = split_views([tr[i] for i in idx], rng, max_genes=view_genes) if contrastive_weight else [tr[i] for i in idx]
        b = masked_batch(views, pad_token_id=cfg.pad_token_id, pad_value=cfg.pad_value, rng=rng)
        states = model.states(b["gene_ids"], b["values"], b["attn_mask"], b["gen_mask"])
        expr, mvc = model.heads(states[-1], b["gene_ids"])
        mse = (_masked_mse(expr, b["target"], b["gen_mask"]) + _masked_mse(mvc, b["target"], b["gen_mask"])) / 2
        con, iso = contrastive_loss(states, b, temperature=temperature, offset_weight=offset_weight,
                                    pr_weight=pr_weight) if contrastive_weight else (torch.zeros(()), torch.zeros(()))
        loss = mse / bin_var + contrastive_weight * (con + iso)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            history.append({"step": step, "train_mse": round(mse.item(), 4), "train_contrastive": round(con.item(), 4),
                            "train_isotropy": round(iso.item(), 4)})
            logger.info("step %d/%d masked MSE %.2f, NT-Xent %.3f, isotropy penalty %.3f (%.0f s)", step, steps, mse.item(),
                        con.item(), iso.item(), time.perf_counter() - t0)
            model.train()
    after = evaluate(model, val, tr, seed=seed + 1, pad_token_id=cfg.pad_token_id)
    metrics = {
        "command": _command(out, steps=steps, seed=seed, threads=threads, pr_weight=pr_weight, view_genes=view_genes),
        "data": "scanpy.datasets.pbmc68k_reduced(): 700 cells x 765 genes, "
        "counts = rint(expm1(raw.X) * n_counts / 1e4)",
        "n_train_cells": len(tr), "n_val_cells": len(val), "val_cell_idx": sorted(int(i) for i in order[:N_VAL]),
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads,
        "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "mlm_probability": MLM_PROBABILITY,
        "objective": {"contrastive_weight": contrastive_weight, "temperature": temperature, "view_max_genes": view_genes,
                      "loss_pools": list(LOSS_POOLS), "centred_bias_init_cells": 128,
                      "offset_weight": offset_weight, "pr_weight": pr_weight},
        "val_before_training": before, "val_after_training": after, "history": history,
        "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__, "python": platform.python_version(),
    }
    metrics["cpu_seconds"] = round(time.process_time() - c0, 1)
    _write_checkpoint(out, model, vocab, model_cfg, collator_cfg)
    metrics["pbmc_geometry"] = checkpoint_geometry(out)
    _write_card(out, metrics)
    return metrics


def _command(out: Path, *, steps: int, seed: int, threads: int, pr_weight: float, view_genes: int) -> str:
    cmd = f"python -m sclstore.ingest.models.train_tiny --steps {steps} --seed {seed} --threads {threads}"
    if pr_weight != PR_WEIGHT:
        cmd += f" --pr-weight {pr_weight:g}"
    if view_genes != VIEW_MAX_GENES:
        cmd += f" --view-genes {view_genes}"
    return cmd if Path(out).resolve() == DEFAULT_OUT else f"{cmd} --out {out}"


def _write_card(out: Path, metrics: dict[str, Any]) -> None:
    (out / "training.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out / "README.md").write_text(render_readme(metrics))


def _write_checkpoint(out: Path, model: nn.Module, vocab: dict[str, int], model_cfg: dict[str, Any],
                      collator_cfg: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})  # one key: byte-stable header
    (out / "model_config.yml").write_text(yaml.safe_dump(model_cfg, sort_keys=False))
    (out / "collator_config.yml").write_text(yaml.safe_dump(collator_cfg, sort_keys=False))
    (out / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")


def evaluate_checkpoint(folder: Path) -> dict[str, float]:
    """Recompute the held-out metrics of a trained checkpoint folder from its committed files.

    Loads every weight (decoder heads included) strictly and re-runs :func:`evaluate` on the
    held-out cells recorded in ``training.json``; the result should equal
    ``training.json["val_after_training"]``.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "training.json").read_text())
    cfg = TahoeConfig.from_dicts(
        yaml.safe_load((folder / "model_config.yml").read_text()),
        yaml.safe_load((folder / "collator_config.yml").read_text()),
    )
    model = TahoePretrainModel(cfg)
    state = {k.removeprefix("model."): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    counts, genes = load_pbmc_counts()
    vocab = json.loads((folder / "vocab.json").read_text())
    records = _tokenize_all(cfg, vocab, genes, counts, seed=meta["seed"])
    val_idx = set(meta["val_cell_idx"])
    val = [r for r in records if r.cell_idx in val_idx]
    tr = [r for r in records if r.cell_idx not in val_idx]
    return evaluate(model, val, tr, seed=meta["seed"] + 1, pad_token_id=cfg.pad_token_id)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pr-weight", type=float, default=PR_WEIGHT)
    parser.add_argument("--view-genes", type=int, default=VIEW_MAX_GENES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    metrics = train(args.out, steps=args.steps, seed=args.seed, threads=args.threads, pr_weight=args.pr_weight,
                    view_genes=args.view_genes)
    logger.info("wrote %s: val MSE %.2f (mean-bin baseline %.2f)", args.out, metrics["val_after_training"]["mse_expr"],
                metrics["val_after_training"]["mse_mean_bin"])


if __name__ == "__main__":
    main()
