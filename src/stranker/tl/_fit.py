"""sr.tl.fit: train the image-gene model on one or more sections."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._constants import Keys
from .._docs import doc_params
from ..write import check_key_added
from ._training import targets as targets  # where it was; the training pieces live in _training


@doc_params()
def fit(
    data: Any,
    *,
    genes: Sequence[str] | str | None = None,
    layer: str | None = None,
    target_sum: float = 1e4,
    method: str = "stranker",
    backbone: str | None = None,
    weights: str | None = None,
    pretrained: bool = True,
    freeze: bool | str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    seed: int | None = None,
    image_features: str | None = None,
    n_top_genes: int = 1000,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    stream: bool | None = None,
    key_added: str = Keys.PREFIX,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    bin_size: int | None = None,
    aggregate: bool = True,
    unlabeled: Any = None,
    spot_diameter_um: float | None = None,
    microns_per_pixel: float | None = None,
    **options: Any,
):
    """Train the image-gene model and write its in-sample results.

    Parameters
    ----------
    data
        One section or a list (SpatialData with image, circle spots and table, or AnnData in
        squidpy layout). Raw counts in ``X`` or ``layers[layer]``.
    genes
        Genes to model: a list; ``'hvg'`` / ``'heg'`` (``n_top_genes`` chosen on these sections);
        ``None`` uses ``var['stranker_selected']`` from :func:`stranker.pp.select_genes` when every
        table has it, else ``'hvg'``.
    layer
        Layer of raw counts; ``None`` uses ``X``.
    target_sum
        The target is ``log1p(counts / total * target_sum)`` over all genes of the table (scanpy's).
    method
        ``'stranker'`` (default), or a published recipe: ``'bleep'``, ``'mclstexp'``, ``'rankbygene'``.
    backbone
        A named foundation model (``'uni'``, ``'uni2-h'``, ``'h-optimus-0'``, ``'virchow2'``, ...; see
        :func:`stranker.tl.backbones`), ``'hf-hub:ORG/NAME'`` or any timm model name (default
        ``'resnet18'``). A named model also sets the defaults of ``image_size`` and of the patch's
        physical size (``patch_um``, e.g. 224 px at 0.5 µm/px) to those it was trained at.
        ``'test_resnet'`` is a tiny network for trying things in seconds on a CPU (with
        ``pretrained=False``; its predictions mean nothing).
    weights
        Local state dict of the backbone (``.safetensors``, ``.pth``). Without it the pretrained weights
        come from the Hugging Face cache, else are downloaded (``sr.settings.allow_download``, not under
        ``HF_HUB_OFFLINE``); if they cannot be had, an error says how to get them.
    pretrained
        ``False`` trains from random initialisation (a warning says so); the only way to get it.
    freeze
        ``True`` trains the heads on a frozen backbone, ``False`` fine-tunes it, ``'last:N'`` its last N
        blocks; default: frozen for the foundation models of the registry, fine-tuned otherwise.
    epochs, batch_size
        Training length and spots per batch (each batch holds spots of one section). With resolution
        jitter, ``sharp_epochs`` (default 4) more train a copy on sharp patches (see ``docs/method.md``).
    device
        ``'auto'``, ``'cpu'``, ``'cuda'``; default ``sr.settings.device``.
    seed
        Random seed; the same seed on the same device gives the same model.
    image_features
        Train on precomputed per-spot features ``obsm[image_features]`` instead of pixels.
    n_top_genes
        Genes chosen when ``genes`` is ``'hvg'`` / ``'heg'``.
    checkpoint_dir, checkpoint_every, resume
        Save the full training state every ``checkpoint_every`` epochs; ``resume=True`` continues
        an interrupted fit from the last checkpoint to the same result (on any number of processes).
        A checkpoint of other data, genes or settings is refused, naming what differs
        (``resume=False`` starts afresh); one fit at a time may use a ``checkpoint_dir``.
    stream
        ``False`` reads every training patch into memory first; ``True`` streams them from the
        (lazy) images, batch by batch, in ``sr.settings.num_workers`` DataLoader workers;
        ``None`` (default) streams when the patches would exceed ``sr.settings.max_patch_memory``
        bytes. Both give the same model for the same seed.
    key_added
        Prefix of the written keys.
    {doc_elements}
    {doc_library_key}
    {doc_bin_size}
    aggregate
        Visium HD: sum the bins into square pseudo-spots as wide as the patch the model reads
        (:func:`stranker.io.aggregate_bins`; the table ``'square_{width:03d}um'`` and its squares are
        added, or reused when present), so that the target is the expression of the tissue the patch
        shows. ``False`` trains on every bin against the patch centred on it.
    unlabeled
        Sections whose H&E, not expression, also trains the image branch: the mean-teacher term
        ``w_consistency`` (required > 0) asks the student's predicted expression on a strongly
        augmented view of their spots' patches to match the EMA teacher's on a weak view. Pass the
        slides you will predict (test-time training on their tissue); same formats as ``data``,
        counts not needed and never read. Their patches are held in memory.
    {doc_resolution}
    **options
        Any field of :class:`stranker.model.Config` (``scales``, ``patch_px``, ``w_rank``, ``predict``, ...).
        Reliability (on by default): ``reliability=False`` turns it off (and the fold models' time);
        ``reliability_folds`` (at most 5 held-out groups), ``reliability_epochs`` (a fold model trains
        this share of the epochs, 0.1, and at least one sharp epoch), ``interval_level`` (0.9), ``fdr`` (0.1).

    Returns
    -------
    The fitted :class:`stranker.Model`. In each training table, after the whole fit succeeded:

    - ``obsm['X_{key_added}']``: teacher image embedding of every spot;
    - ``layers[key_added]``: predicted expression (target scale) for the modelled genes; other
      genes hold NaN;
    - ``uns[key_added]``: parameters, genes, per-epoch history of every loss term, timing, device,
      ``in_sample=True`` (these spots were seen in training), and ``expression_rank``: the number of
      principal axes of the training expression that predictions are projected onto
      (``predict_rank``, by default those above its noise; ``predict_rank=0`` turns it off);
    - ``var['{key_added}_cv_pcc']`` (``_lo``, ``_hi``) and ``var['{key_added}_reliable']``: the
      reliability of each gene, estimated on sections held out of the fit (below).

    **Reliability.** With two or more training sections, the fit also trains one fold model per
    section (or per patient, where every table names one in ``uns['patient']``; at most
    ``reliability_folds`` groups), each on the other sections for ``reliability_epochs`` of the epochs,
    and predicts the section it did not see. From these out-of-fold predictions: each gene's Pearson r
    on a new section (``cv_pcc``, the mean over held-out sections on Fisher's z scale, with a 90 %
    interval for one new section), and ``reliable``: r > 0 at false-discovery rate ``fdr``
    (Benjamini-Hochberg over a t-test across the held-out sections) and ``cv_pcc`` >= 0.1. Also
    conformal quantiles of the residuals, which give :func:`stranker.tl.predict`'s per-spot intervals,
    and the calibration of its shift score. The record is ``model.reliability`` (a DataFrame), saved
    with the model; the fold models stay in ``model.fold_models`` for this session only.

    Under ``torchrun`` (``stranker fit --nproc N``) every process calls ``fit`` with the same
    arguments and trains on its share of each batch (see :mod:`stranker.train.distributed`); all
    return the same model, and only rank 0 computes and writes the in-sample results.
    """
    from ..model import make_config
    from ._model import Model

    check_key_added([], key_added)  # a name (train() reads None as "write nothing")
    cfg = make_config(method, backbone=backbone, weights=weights, epochs=epochs, batch_size=batch_size,
                      image_features=image_features, pretrained=pretrained, freeze=freeze, **options)
    model = Model(cfg, genes, n_top_genes=n_top_genes, target_sum=target_sum)  # cfg.chosen: what was set
    return model.train(
        data, layer=layer, device=device, seed=seed, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, resume=resume, stream=stream, key_added=key_added,
        image_key=image_key, shapes_key=shapes_key, table_key=table_key, library_id=library_id,
        library_key=library_key, bin_size=bin_size, aggregate=aggregate, unlabeled=unlabeled,
        spot_diameter_um=spot_diameter_um, microns_per_pixel=microns_per_pixel,
    )
