"""The user-facing model: a trained Aligner with its genes, target scaling and reference bank."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._docs import doc_params
from .._errors import InputError
from .._settings import logger, settings
from ..section import Section, as_sections
from ..section.patches import PatchGeometry, PatchReader, check_inside
from ..spots import SpotInputs, check_workers, device_of, run_batches, tensor_batches
from ..write import unchanged_on_failure, write_outputs
from ._record import RunRecord
from ._reliability import Reliability, cross_fit, in_sample
from ._training import (
    TrainingInputs,
    choose_genes,
    feature_record,
    reference_bank,
    training_sections,
    unlabeled_patches,
)

ADAPT_MOST = 2048  # patches of a section whose batch-norm statistics `adapt=True` takes, evenly spread
ADAPT_FEWEST = 2  # below this `adapt=True` is refused: one patch's statistics are its own values


class Model:
    """An image-gene model: built from a configuration, trained on sections, then predicts.

    ``sr.tl.fit`` makes one, trains it and writes its in-sample results; the object does the same
    in steps::

        model = sr.Model(sr.model.make_config("stranker", epochs=3), genes="hvg")
        model.train(sdata)  # or a list of sections
        model.predict(other)

    Parameters
    ----------
    config
        A :class:`stranker.model.Config` (:func:`stranker.model.make_config`); default: the
        ``'stranker'`` preset. A named ``backbone`` sets ``image_size`` and ``patch_um`` where the
        user did not set them (the configuration's ``chosen``: the options given to ``make_config``),
        so ``sr.Model(make_config(**options)).train(data)`` gives the model ``sr.tl.fit(data, **options)``
        gives.
    genes
        Genes to model: a list; ``'hvg'`` / ``'heg'`` (``n_top_genes`` chosen on the training
        sections); ``None`` uses ``var['stranker_selected']`` when every table has it, else ``'hvg'``.
    n_top_genes
        Genes chosen when ``genes`` is ``'hvg'`` / ``'heg'``.
    target_sum
        The target is ``log1p(counts / total * target_sum)`` over all genes of the table (scanpy's).
    aligner, meta, bank
        The parts of a trained model (as :meth:`load` assembles it): network, run record
        (a ``RunRecord`` or its dict), reference bank (``keys``, ``values``).

    Attributes
    ----------
    config
        The :class:`stranker.model.Config` it was trained with.
    genes
        Modelled genes, in the order of the predicted columns (empty until trained when chosen on data).
    meta
        Its run record (``RunRecord``): what it was trained on and how, by attribute
        (``model.meta.device``).
    history
        Per-epoch values of every loss term.
    is_trained
        Whether the weights come from a finished fit.
    """

    def __init__(
        self, config: Any = None, genes: Sequence[str] | str | None = None, *, n_top_genes: int = 1000,
        target_sum: float = 1e4, aligner: Any = None, meta: RunRecord | Mapping[str, Any] | None = None,
        bank: Mapping[str, Any] | None = None,
    ):
        from ..model import Config, make_config
        from ..model.config import validate

        if config is None:
            config = make_config()
        if not isinstance(config, Config):
            raise InputError(
                "`config` must be a stranker.model.Config (sr.model.make_config(...)), "
                f"got {type(config).__name__}."
            )
        if aligner is None:  # a configuration built by hand is checked as make_config checks it
            try:
                validate(config)
            except ValueError as err:
                raise InputError(str(err)) from None
        if aligner is not None and (genes is None or isinstance(genes, str)):
            raise InputError("A trained model (`aligner=`) needs its list of `genes`.")
        self.config = config
        self.aligner = aligner
        self.genes = [] if genes is None or isinstance(genes, str) else list(genes)
        self._genes = genes if genes is None or isinstance(genes, str) else list(genes)  # as asked
        self._n_top_genes = n_top_genes
        self._target_sum = target_sum
        self.meta = RunRecord() if meta is None else meta
        self.bank = dict(bank or {})  # keys: gene embeddings, values: log-scale expression
        self.is_trained = aligner is not None
        self.fold_models: list[Model] = []  # this session's fit: the reliability fold models (not saved)

    @property
    def meta(self) -> RunRecord:
        """The run record: what the model was trained on and how (saved in ``model.json``)."""
        return self._meta

    @meta.setter
    def meta(self, value: RunRecord | Mapping[str, Any]) -> None:
        self._meta = value if isinstance(value, RunRecord) else RunRecord.from_dict(value)

    @property
    def history(self) -> list[dict[str, float]]:
        """Per-epoch values of every loss term."""
        return self.meta.history

    def __repr__(self) -> str:
        c = self.config
        if not self.is_trained:
            asked = self._genes if isinstance(self._genes, str) or self._genes is None else len(self.genes)
            return (f"stranker.Model(method={c.method!r}, backbone={c.backbone!r}, genes={asked!r}, "
                    "not trained)")
        return (
            f"stranker.Model(method={c.method!r}, backbone={c.backbone!r}, "
            f"weights={self.meta.weights_source or '?'!r}, genes={len(self.genes)}, "
            f"scales={list(c.scales)}, trained on {self.meta.n_spots or '?'} spots of "
            f"{len(self.meta.sections)} section(s))"
        )

    def _check_trained(self) -> None:
        if not self.is_trained:
            raise InputError("This model is not trained yet: call `model.train(data)` first.")

    # ---------------------------------------------------------------- training
    @unchanged_on_failure()
    @doc_params()
    def train(
        self,
        data: Any,
        *,
        layer: str | None = None,
        device: str | None = None,
        seed: int | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 1,
        resume: bool = False,
        stream: bool | None = None,
        key_added: str | None = None,
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
    ) -> Model:
        """Train on one or more sections (what :func:`stranker.tl.fit` does; see it for details).

        Parameters
        ----------
        data
            One section or a list (SpatialData with image, circle spots and table, or AnnData in
            squidpy layout). Raw counts in ``X`` or ``layers[layer]``.
        layer
            Layer of raw counts; ``None`` uses ``X``.
        device
            ``'auto'``, ``'cpu'``, ``'cuda'``; default ``sr.settings.device``.
        seed
            Random seed (default ``sr.settings.seed``); the same seed on the same device gives the
            same model, and the same as ``sr.tl.fit`` with that seed.
        checkpoint_dir, checkpoint_every, resume
            Save the full training state every ``checkpoint_every`` epochs; ``resume=True``
            continues an interrupted training from the last checkpoint to the same result.
        stream
            ``False`` reads every training patch into memory first, ``True`` streams them;
            ``None`` streams when they would exceed ``sr.settings.max_patch_memory`` bytes.
        key_added
            Also write the in-sample results (``obsm['X_{key_added}']``, ``layers[key_added]``,
            ``uns[key_added]``) into the training tables, as :func:`stranker.tl.fit` does;
            ``None`` (default) writes nothing but the pseudo-spots of ``aggregate``.
        {doc_elements}
        {doc_library_key}
        {doc_bin_size}
        aggregate
            Visium HD: train on the bins summed into pseudo-spots as wide as the patch
            (:func:`stranker.io.aggregate_bins`); ``False`` trains on every bin.
        unlabeled
            Sections whose H&E, not expression, also trains the model (``w_consistency``).
        {doc_resolution}

        Returns
        -------
        The model itself, trained. A model trains once: to train again, make a new one
        (``sr.Model(model.config, model.genes)``).
        """
        import time

        import torch

        from ..model import Aligner
        from ..train import checkpoint, distributed, resolve_device, train
        from ..train.loop import kept_rng

        if self.is_trained:
            raise InputError(
                "This model is trained already; `train` starts from the configuration, not from its "
                "weights. To train again, make a new model: `sr.Model(model.config, model.genes)`."
            )
        t_start = time.perf_counter()
        seed = settings.seed if seed is None else int(seed)
        cfg = self.config
        checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir).expanduser()
        checkpoint.check_arguments(checkpoint_dir, checkpoint_every, resume)  # before reading any data
        if cfg.image_features is None:  # an unknown backbone or missing weights fail before any work
            from ..model.backbones import find_weights, resolve

            spec = resolve(cfg.backbone, settings.allow_download)
            find_weights(spec, cfg.weights, cfg.pretrained, settings.allow_download)
        dev = distributed.setup(resolve_device(device or settings.device))
        secs, cfg, geometry = training_sections(
            data, cfg, key_added=key_added, aggregate=aggregate, image_key=image_key, shapes_key=shapes_key,
            table_key=table_key, library_id=library_id, library_key=library_key, bin_size=bin_size,
            spot_diameter_um=spot_diameter_um, microns_per_pixel=microns_per_pixel,
        )
        unl = unlabeled_patches(unlabeled, cfg, geometry)  # refused before any training patch is read
        genes = choose_genes(secs, self._genes, layer, self._n_top_genes)
        inputs = TrainingInputs.of(secs, genes, cfg, geometry, layer=layer, target_sum=self._target_sum,
                                   stream=stream)
        if unl is not None:
            inputs.data.unlabeled = torch.from_numpy(unl)
        with kept_rng(dev):  # the caller's global random state is theirs again after training
            torch.manual_seed(seed)
            aligner = Aligner(cfg, len(genes), feature_dim=inputs.feature_dim,
                              download=settings.allow_download)
        features = feature_record(secs, cfg.image_features)
        source = features.get("weights_source") if cfg.image_features is not None else aligner.weights_source
        if aligner.student.frozen:
            logger.info(f"The backbone {cfg.backbone!r} is frozen: stranker trains its heads on it "
                        "(freeze=False fine-tunes it, freeze='last:N' its last N blocks).")
        if source == "random":
            logger.warning(
                f"Training on a randomly initialised backbone ({features.get('backbone', cfg.backbone)!r}, "
                "asked with pretrained=False): expect much lower accuracy than with pretrained weights."
            )
        t_train = time.perf_counter()
        history = train(aligner, inputs.data, device=dev, seed=seed, checkpoint_dir=checkpoint_dir,
                        checkpoint_every=checkpoint_every, resume=resume, progress=settings.show_progress(),
                        identity={"genes": list(genes)}, num_workers=settings.num_workers)
        train_s = time.perf_counter() - t_train
        bank = reference_bank(aligner, inputs, dev)
        mpps = [sp.microns_per_pixel for sp in secs]
        mpp = mpps[0] if all(m is not None for m in mpps) else None  # as PatchGeometry.of records it
        record = RunRecord(
            genes_source=self._genes if isinstance(self._genes, str) or self._genes is None else "list",
            target=f"log1p(counts / total * {self._target_sum:g}) over all genes of the table",
            target_sum=self._target_sum, layer=layer, target_mean=inputs.mean.astype(np.float32),
            target_std=inputs.std.astype(np.float32), history=history, sections=[sp.name for sp in secs],
            n_spots=inputs.n_spots,
            **(geometry.to_meta() if geometry else
               {"patch_um": None, "patch_px": float(cfg.patch_px), "microns_per_pixel": mpp}),
            spot_diameter_px=float(np.median([sp.diameter for sp in secs])),
            spot_diameter_um=float(np.median([sp.diameter * sp.microns_per_pixel for sp in secs]))
            if all(sp.microns_per_pixel is not None for sp in secs) else None,
            weights_source=aligner.weights_source, device=str(dev), seed=seed,
            feature_dim=inputs.feature_dim, features=features or None, torch=torch.__version__,
            train_seconds=train_s, streamed=inputs.data.streamed, world_size=distributed.world_size(),
        )
        before = dict(vars(self))
        self.aligner, self.config, self.genes, self.meta, self.bank = aligner, cfg, list(genes), record, bank
        self.is_trained = True
        try:
            insample = (in_sample(self, inputs, dev, colour=cfg.reliability)
                        if key_added is not None or cfg.reliability else None)
            if cfg.reliability:  # every process of a distributed fit trains the same fold models
                found = cross_fit(self, inputs, dev, seed, insample)
                if found is not None:
                    self.bank = {**bank, **found.to_bank()}
            if distributed.rank() != 0:  # the other processes of a distributed fit hold the same model
                return self
            record.fit_seconds = time.perf_counter() - t_start
            if key_added is not None:
                for sp, (emb, pred, *_) in zip(inputs.sections, insample, strict=True):
                    write_outputs(sp, self, emb, pred, key_added, in_sample=True)
        except BaseException:  # the model is untrained again, as the data is unchanged
            vars(self).clear()
            vars(self).update(before)
            raise
        return self

    # ---------------------------------------------------------------- inference
    def _device(self, device: str | None):
        return device_of(device)

    @property
    def geometry(self) -> PatchGeometry:
        """How wide its patches are, as recorded by the fit (saved in ``meta``)."""
        m = self.meta
        recorded = {"patch_px": m.patch_px, "patch_um": m.patch_um, "microns_per_pixel": m.microns_per_pixel}
        return PatchGeometry.from_meta(recorded, self.config)

    def patch_reader(self, sp: Section) -> PatchReader:
        """Return the reader of ``sp``'s patches as this model sees them (scales, input size, width)."""
        c = self.config
        return PatchReader(sp, self.geometry.size_on(sp), c.scales, c.image_size)

    def coarser(self, sp: Section) -> float:
        """How many times less detail ``sp``'s patches give the backbone than the training slides' did.

        Detail is the pixels per patch side up to the backbone's input size: a slide scanned finer than
        the input is as sharp as the training slides. 1 for a slide at their resolution.
        """
        g, size = self.geometry, self.config.image_size
        # a section of unknown scale is read at the training width (size_on warns once, where it is read)
        side = g.size_on(sp) if sp.microns_per_pixel is not None else g.size_px
        return min(g.size_px, size) / min(side, size)

    def infer(self, sp: Section, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Teacher embeddings and predicted expression (log scale) of one section, streamed in batches.

        The weights visit the device for the call and are put back where (and in the mode) they were.
        """
        self._check_trained()
        param = next(self.aligner.parameters(), None)
        home = param.device if param is not None else None
        modes = [(m, m.training) for m in self.aligner.modules()]
        try:
            return self._infer(sp, **kwargs)
        finally:
            if home is not None:
                self.aligner.to(home)
            for m, training in modes:
                m.training = training

    def _inputs(
        self, sp: Section, *, centers: np.ndarray | None = None, features: np.ndarray | None = None,
        patches: np.ndarray | None = None,
    ) -> SpotInputs:
        """Return what this model reads of ``sp``: features, the patches given, or patches from its image.

        ``features`` (a model on precomputed features) or ``patches`` (its spots' patches, as its
        reader cuts them) are inputs already in memory, used instead of reading them; ``centers``
        (level-0 pixels) are read instead of the section's spots.
        """
        c = self.config
        if c.image_features is None:
            if patches is not None:
                return SpotInputs.held(patches, name=sp.name)
            return SpotInputs.streamed(self.patch_reader(sp), centers)
        if features is None:
            if c.image_features not in sp.table.obsm:
                raise InputError(
                    f"The model was trained on `obsm[{c.image_features!r}]`, missing from section "
                    f"{sp.name!r}."
                )
            features = np.asarray(sp.table.obsm[c.image_features])[sp.rows]
        dim = self.meta.feature_dim
        if np.ndim(features) != 2 or (dim is not None and features.shape[1] != dim):
            raise InputError(
                f"`obsm[{c.image_features!r}]` of section {sp.name!r} has shape {np.shape(features)}; "
                f"the model was trained on {dim} features per spot: compute them with the same backbone."
            )
        if not np.isfinite(features).all():
            raise InputError(
                f"`obsm[{c.image_features!r}]` of section {sp.name!r} has NaN or infinite values."
            )
        return SpotInputs.held(features, kind="features", name=sp.name)

    def _infer(
        self, sp: Section, *, centers: np.ndarray | None = None, device: str | None = None,
        batch_size: int = 128, features: np.ndarray | None = None, patches: np.ndarray | None = None,
        adapt: bool = False, branch: str | None = None, colour: bool = False, num_workers: int | None = None,
    ) -> tuple[np.ndarray, ...]:
        """Teacher embeddings and predicted expression (log scale) of one section, streamed in batches.

        See :meth:`_inputs` for ``centers``, ``features`` and ``patches``. ``branch``: ``'sharp'`` or
        ``'coarse'`` reads with that image branch of a model with a sharp finish whatever the section's
        resolution (default: the one :meth:`branch_of` picks). ``colour``: also return per spot the
        mean and sd of the optical density of each colour channel of the patch the network sees
        (``(n, 6)``; NaN for a model on features). ``num_workers``: threads that read patches streamed
        from the image ahead of the network (``None``: :data:`stranker.spots.READ_WORKERS`; the
        outputs are the same for any number).
        """
        import torch

        from ..model import retrieve
        from ..model.lowrank import project

        inputs = self._inputs(sp, centers=centers, features=features, patches=patches)
        dev = self._device(device)
        al = self.aligner.to(dev).eval()
        c = self.config
        mean = torch.as_tensor(self.meta.target_mean, device=dev)
        std = torch.as_tensor(self.meta.target_std, device=dev)
        if c.predict != "head":
            keys = torch.as_tensor(self.bank["keys"], device=dev)
            values = torch.as_tensor(self.bank["values"], device=dev)
        axes = self._axes()
        if axes is not None:
            center, axes = (torch.as_tensor(a, device=dev) for a in axes)
        if c.image_features is not None:
            branch = al.teacher
        elif branch is None:
            branch = al.branch_for(self.coarser(sp))
        else:
            branch = al.coarse if branch == "coarse" and al.coarse is not None else al.teacher
        if adapt:
            if c.image_features is not None:
                raise InputError("`adapt=True` renews a backbone's statistics: a model on features has none.")
            if len(inputs) < ADAPT_FEWEST:  # one patch's statistics would normalise it against itself
                raise InputError(
                    f"`adapt=True` renews the backbone's batch-norm statistics from the patches of the "
                    f"section predicted, but section {sp.name!r} has {len(inputs)} spot(s), fewer than "
                    f"{ADAPT_FEWEST}: predict it with adapt=False (the statistics of the training slides)."
                )
            if len(inputs) <= ADAPT_MOST:  # read once, for the statistics and the predictions
                inputs = inputs.in_memory(batch_size, num_workers=check_workers(num_workers))
            branch = self._adapted(branch, inputs, batch_size, dev, num_workers)
        tta = c.tta and c.image_features is None

        def step(x: Any) -> tuple[Any, Any]:
            e, p = branch.forward_tta(x, tta)
            e, head = e.float(), p.float() * std + mean
            if c.predict == "head":
                out = head
            else:
                ret = retrieve(e, keys, values, c.top_k)
                out = ret if c.predict == "retrieval" else c.blend * head + (1 - c.blend) * ret
            if axes is not None:
                out = project(out, center, axes)
            if not colour:
                return e, out
            if x.dtype != torch.float32 or x.ndim != 5:  # features: no pixels
                return e, out, torch.full((len(x), 6), float("nan"), device=x.device)
            od = -torch.log((x[:, 0].float() * 255 + 1) / 256)  # (b, 3, h, w) optical density
            return e, out, torch.cat([od.mean((2, 3)), od.std((2, 3))], 1)

        dims = (c.embed_dim, len(self.genes)) + ((6,) if colour else ())
        outs = run_batches(step, inputs, device=dev, dims=dims, batch_size=batch_size, desc="predict",
                           num_workers=num_workers)
        emb, pred = outs[0], outs[1]
        if not (np.isfinite(pred).all() and np.isfinite(emb).all()):  # never written, nor returned
            from ._persist import non_finite

            bad = non_finite(self.aligner.state_dict(), self.bank)
            cause = (f"its weights hold NaN or infinite values ({len(bad)} tensor(s), e.g. {bad[0]}): it "
                     "diverged in training, or its weights were changed after" if bad else
                     "its weights are finite, but its outputs overflow: the model diverged")
            raise InputError(
                f"The model predicts NaN or infinite values on section {sp.name!r}: {cause}. Fit it again "
                "(a lower `lr`); nothing was written."
            )
        return (emb, pred, outs[2]) if colour else (emb, pred)

    def branch_of(self, sp: Section) -> str:
        """Return ``'coarse'`` when this model reads ``sp`` with its jittered teacher, else ``'sharp'``."""
        al = self.aligner
        if self.config.image_features is not None or getattr(al, "coarse", None) is None:
            return "sharp"
        return "coarse" if al.branch_for(self.coarser(sp)) is al.coarse else "sharp"

    def _axes(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Mean and principal axes of the training targets that predictions are projected onto, or None.

        Computed from the reference bank's targets for ``config.predict_rank`` on first use, then kept.
        """
        from ..model.lowrank import expression_axes

        rank = self.config.predict_rank
        if rank == 0:
            return None
        values = self.bank["values"]
        kept = getattr(self, "_axes_kept", None)  # (rank, the values they came from, axes)
        if kept is None or kept[0] != rank or kept[1] is not values:
            kept = self._axes_kept = (rank, values, expression_axes(values, rank))
        return kept[2]

    @property
    def reliability_record(self) -> Reliability | None:
        """The reliability record of the fit (fold models' out-of-fold results), or ``None``."""
        if not self.is_trained:
            return None
        kept = getattr(self, "_reliability_kept", None)
        if kept is None or kept[0] is not self.bank:
            kept = self._reliability_kept = (self.bank, Reliability.from_bank(self.bank))
        return kept[1]

    @property
    def reliability(self) -> Any:
        """Per-gene reliability, estimated on sections held out of the fit (a DataFrame), or ``None``.

        Index: the modelled genes. Columns: ``cv_pcc`` (the estimated Pearson r of the gene on a new
        section, what :func:`stranker.tl.evaluate` would report there), ``cv_pcc_lo`` / ``cv_pcc_hi`` (its
        interval at ``config.interval_level``), ``p`` (one-sided p-value of r > 0 across the held-out
        sections) and ``reliable`` (r > 0 at false-discovery rate ``config.fdr``, Benjamini-Hochberg, and
        estimated r >= 0.1). ``None`` for a model fitted with ``reliability=False``, on one section, or
        saved before stranker estimated it.
        """
        rec = self.reliability_record
        return None if rec is None else rec.table(list(self.genes), float(self.config.fdr))

    def trust(
        self, sp: Section, emb: np.ndarray, pred: np.ndarray, colour: np.ndarray
    ) -> dict[str, Any] | None:
        """Intervals, per-spot difficulty and the shift record of one section's outputs.

        ``emb``, ``pred``, ``colour``: what :meth:`infer` returns with ``colour=True``. ``None`` when the
        model has no reliability record.
        """
        rec = self.reliability_record
        if rec is None:
            return None
        branch = self.branch_of(sp)
        d = rec.difficulty(emb, branch)
        lower, upper = rec.intervals(pred, d)
        coarser = self.coarser(sp) if self.config.image_features is None else None
        patient = sp.table.uns.get("patient") if sp.table is not None else None
        shift = rec.shift(d, colour, branch, coarser=coarser, patient=patient)
        return {"lower": lower, "upper": upper, "difficulty": d, "shift": shift}

    @property
    def expression_rank(self) -> int | None:
        """Number of principal axes of the training targets its predictions lie on (None: not projected)."""
        self._check_trained()
        axes = self._axes()
        return None if axes is None else int(axes[1].shape[1])

    def _adapted(
        self, branch: Any, inputs: SpotInputs, batch_size: int, dev: Any, num_workers: int | None = None
    ) -> Any:
        """Return the teacher with batch-norm statistics of up to ``ADAPT_MOST`` inputs, evenly spread.

        The inputs are read in batches of near-equal size (each counts the same in the statistics), so
        none holds a single patch.
        """
        from ..model.adapt import adapt_norm

        n = len(inputs)
        rows = np.unique(np.linspace(0, n - 1, min(n, ADAPT_MOST)).round().astype(np.int64))
        even = -(-len(rows) // -(-len(rows) // batch_size))  # ceil(n / ceil(n / batch_size))
        batches = tensor_batches(inputs, dev, even, rows, num_workers=check_workers(num_workers))
        return adapt_norm(branch, batches)

    def _each(
        self, data: Any, which: int, device: str | None, keys: dict[str, Any], adapt: bool = False,
        num_workers: int | None = None,
    ) -> Any:
        """Output ``which`` of :meth:`infer` (0 embedding, 1 expression) for every section of ``data``."""
        self._check_trained()
        secs = as_sections(data, need_image=self.config.image_features is None, need_table=False, **keys)
        out = []
        for sp in secs:
            if self.config.image_features is None:
                check_inside(sp)
            out.append(self.infer(sp, device=device, adapt=adapt, num_workers=num_workers)[which])
        return out if isinstance(data, list | tuple) else out[0]

    def predict(
        self, data: Any, *, device: str | None = None, adapt: bool = False, num_workers: int | None = None,
        **keys: Any,
    ) -> np.ndarray | list[np.ndarray]:
        """Predicted expression ``(n_spots, n_genes)`` on the target scale, for the spots of each section.

        Parameters
        ----------
        data
            SpatialData, AnnData (squidpy layout) or a list.
        device
            Torch device; default ``sr.settings.device``.
        adapt
            Renew the backbone's batch-norm statistics on each section first (see
            :func:`stranker.tl.predict`); refused for a section of fewer than two spots.
        num_workers
            Threads that read the patches from the image ahead of the network (see
            :func:`stranker.tl.predict`); ``None``: :data:`stranker.spots.READ_WORKERS`.
        **keys
            ``image_key``, ``shapes_key``, ``table_key``, ``library_id``; ``spot_diameter_um`` or
            ``microns_per_pixel`` for data that does not record its scale (see :func:`stranker.tl.fit`).
        """
        return self._each(data, 1, device, keys, adapt, num_workers)

    def embed(
        self, data: Any, *, device: str | None = None, adapt: bool = False, num_workers: int | None = None,
        **keys: Any,
    ) -> np.ndarray | list[np.ndarray]:
        """Teacher image embeddings ``(n_spots, embed_dim)`` of the spots of each section.

        Parameters
        ----------
        data
            SpatialData, AnnData (squidpy layout) or a list.
        device
            Torch device; default ``sr.settings.device``.
        adapt
            Renew the backbone's batch-norm statistics on each section first (see
            :func:`stranker.tl.predict`); refused for a section of fewer than two spots.
        num_workers
            Threads that read the patches from the image ahead of the network (see
            :func:`stranker.tl.predict`); ``None``: :data:`stranker.spots.READ_WORKERS`.
        **keys
            ``image_key``, ``shapes_key``, ``table_key``, ``library_id``; ``spot_diameter_um`` or
            ``microns_per_pixel`` for data that does not record its scale (see :func:`stranker.tl.fit`).
        """
        return self._each(data, 0, device, keys, adapt, num_workers)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Save weights, configuration, genes, target scaling and reference bank into folder ``path``.

        The folder is written whole: both files go into a temporary folder beside ``path``, which is
        then renamed to ``path``, so ``path`` holds the old model or the new one, never a mix (also
        when two processes save there at once). ``path`` must be absent, an empty folder, or (with
        ``overwrite=True``) a folder holding a saved model and nothing else. ``model.pt`` stores a
        checksum of ``model.json``; :meth:`load` refuses a pair that does not match. Weights holding
        NaN or infinite values (a model that diverged) are refused before anything is written.

        Parameters
        ----------
        path
            Folder to save into.
        overwrite
            Replace a model saved there before.
        """
        from ._persist import write_model

        self._check_trained()
        write_model(path, self.config.to_dict(), self.genes, self.meta.to_dict(), self.aligner.state_dict(),
                    self.bank, self.meta.feature_dim, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> Model:
        """Load a model saved with :meth:`save`.

        Nothing in the files can run code (the weights are read with ``weights_only=True``), and a
        ``model.json`` changed after saving (its checksum, stored with the weights, differs) is refused,
        as are weights holding NaN or infinite values and a folder lacking what predicting needs (the
        error names the stranker version that wrote it).

        Parameters
        ----------
        path
            Folder written by :meth:`save`.
        device
            Where to put the weights (default CPU; moved on use).
        """
        from ..model import Aligner, Config
        from ._persist import read_model

        info, blob = read_model(path, device)
        cfg = Config.from_dict(info["config"])
        cfg.pretrained = False  # the weights come from the file
        cfg.weights = None
        al = Aligner(cfg, len(info["genes"]), feature_dim=blob.get("feature_dim"))
        al.load_state_dict(blob["state_dict"])
        al.eval()
        bank = {k: v.cpu().numpy() for k, v in blob["bank"].items()}
        return cls(cfg, info["genes"], aligner=al, meta=RunRecord.from_dict(info["meta"]), bank=bank)
