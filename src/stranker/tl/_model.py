"""The user-facing model: a trained Aligner with its genes, target scaling and reference bank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import move_into_place
from .._settings import logger, settings
from .._spots import InputError, Spots, as_spots
from ..pp._patches import PatchGeometry, PatchReader, check_inside

_FILE = "model.pt"
_META = "model.json"


class Model:
    """A fitted stranker model (returned by :func:`stranker.tl.fit`).

    Attributes
    ----------
    config
        The :class:`stranker.model.Config` it was trained with.
    genes
        Modelled genes, in the order of the predicted columns.
    history
        Per-epoch values of every loss term.
    is_trained
        Whether the weights come from a finished fit.
    """

    def __init__(
        self, aligner: Any, config: Any, genes: list[str], meta: dict[str, Any], bank: dict[str, Any]
    ):
        self.aligner = aligner
        self.config = config
        self.genes = list(genes)
        self.meta = meta
        self.bank = bank  # keys: gene embeddings, values: log-scale expression, image: teacher embeddings
        self.history: list[dict[str, float]] = meta.get("history", [])
        self.is_trained = True

    def __repr__(self) -> str:
        c = self.config
        return (
            f"stranker.Model(method={c.method!r}, backbone={c.backbone!r}, "
            f"weights={self.meta.get('weights_source', '?')!r}, genes={len(self.genes)}, "
            f"scales={list(c.scales)}, trained on {self.meta.get('n_spots', '?')} spots of "
            f"{len(self.meta.get('sections', []))} section(s))"
        )

    # ---------------------------------------------------------------- inference
    def _device(self, device: str | None):
        from ..train import resolve_device

        return resolve_device(device or settings.device)

    @property
    def geometry(self) -> PatchGeometry:
        """How wide its patches are, as recorded by the fit (saved in ``meta``)."""
        return PatchGeometry.from_meta(self.meta, self.config)

    def _reader(self, sp: Spots) -> PatchReader:
        c = self.config
        return PatchReader(sp, self.geometry.size_on(sp), c.scales, c.image_size)

    def infer(self, sp: Spots, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Teacher embeddings and predicted expression (log scale) of one section, streamed in batches.

        The weights visit the device for the call and are put back where (and in the mode) they were.
        """
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

    def _infer(
        self, sp: Spots, *, centers: np.ndarray | None = None, device: str | None = None,
        batch_size: int = 128, features: np.ndarray | None = None, patches: np.ndarray | None = None,
        adapt: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Teacher embeddings and predicted expression (log scale) of one section, streamed in batches.

        ``features`` (a model on precomputed features) or ``patches`` (its spots' patches, as its
        reader cuts them) are inputs already in memory, used instead of reading them.
        """
        import torch

        from ..model import retrieve
        from ..train.loop import to_input

        dev = self._device(device)
        al = self.aligner.to(dev).eval()
        c = self.config
        if c.image_features is not None:
            if features is None:
                if c.image_features not in sp.table.obsm:
                    raise InputError(
                        f"The model was trained on `obsm[{c.image_features!r}]`, "
                        f"missing from section {sp.name!r}."
                    )
                features = np.asarray(sp.table.obsm[c.image_features])[sp.rows]
            dim = self.meta.get("feature_dim")
            if np.ndim(features) != 2 or (dim is not None and features.shape[1] != dim):
                raise InputError(
                    f"`obsm[{c.image_features!r}]` of section {sp.name!r} has shape {np.shape(features)}; "
                    f"the model was trained on {dim} features per spot: compute them with the same backbone."
                )
            if not np.isfinite(features).all():
                raise InputError(
                    f"`obsm[{c.image_features!r}]` of section {sp.name!r} has NaN or infinite values."
                )
            n = len(features)
        elif patches is not None:
            n = len(patches)
        else:
            reader = self._reader(sp)
            n = sp.n_spots if centers is None else len(centers)
        # outputs are filled batch by batch: working memory is one batch, whatever the number of spots
        emb_out = np.empty((n, c.embed_dim), dtype=np.float32)
        pred_out = np.empty((n, len(self.genes)), dtype=np.float32)
        mean = torch.as_tensor(self.meta["target_mean"], device=dev)
        std = torch.as_tensor(self.meta["target_std"], device=dev)
        if c.predict != "head":
            keys = torch.as_tensor(self.bank["keys"], device=dev)
            values = torch.as_tensor(self.bank["values"], device=dev)
        branch = al.teacher
        if adapt:
            own = None if c.image_features is not None or patches is not None else reader
            branch = self._adapted(branch, n, batch_size, dev, features, patches, own, centers)
        from tqdm.auto import tqdm

        starts = range(0, n, batch_size)
        use_amp = dev.type == "cuda"
        for start in tqdm(
            starts, desc=f"predict {sp.name}", disable=not settings.show_progress() or n < 4 * batch_size
        ):
            sl = np.arange(start, min(start + batch_size, n))
            if c.image_features is not None:
                x = torch.from_numpy(np.asarray(features[sl], dtype=np.float32))
            elif patches is not None:
                x = torch.from_numpy(patches[sl])
            elif centers is None:
                x = torch.from_numpy(reader.read(sl))
            else:
                x = torch.from_numpy(reader.read(centers=centers[sl]))
            with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                e, p = branch.forward_tta(to_input(x, dev), c.tta and c.image_features is None)
            e, head = e.float(), p.float() * std + mean
            if c.predict == "head":
                out = head
            else:
                ret = retrieve(e, keys, values, c.top_k)
                out = ret if c.predict == "retrieval" else c.blend * head + (1 - c.blend) * ret
            emb_out[start : start + len(sl)] = e.cpu().numpy()
            pred_out[start : start + len(sl)] = out.cpu().numpy()
        return emb_out, pred_out

    def _adapted(self, branch, n, batch_size, dev, features, patches, reader, centers, most: int = 2048):
        """Return the teacher with batch-norm statistics of up to ``most`` inputs of this section."""
        import torch

        from ..model.adapt import adapt_norm
        from ..train.loop import to_input

        if self.config.image_features is not None:
            raise InputError("`adapt=True` renews the backbone's statistics: a model on features has none.")
        rows = np.unique(np.linspace(0, n - 1, min(n, most)).round().astype(np.int64))

        def batches():
            for start in range(0, len(rows), batch_size):
                sl = rows[start : start + batch_size]
                if patches is not None:
                    x = patches[sl]
                elif centers is None:
                    x = reader.read(sl)
                else:
                    x = reader.read(centers=centers[sl])
                yield to_input(torch.from_numpy(np.asarray(x)), dev)

        return adapt_norm(branch, batches())

    def _each(
        self, data: Any, which: int, device: str | None, keys: dict[str, Any], adapt: bool = False
    ) -> Any:
        """Output ``which`` of :meth:`infer` (0 embedding, 1 expression) for every section of ``data``."""
        secs = as_spots(data, need_image=self.config.image_features is None, need_table=False, **keys)
        out = []
        for sp in secs:
            if self.config.image_features is None:
                check_inside(sp)
            out.append(self.infer(sp, device=device, adapt=adapt)[which])
        return out if isinstance(data, list | tuple) else out[0]

    def predict(
        self, data: Any, *, device: str | None = None, adapt: bool = False, **keys: Any
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
            :func:`stranker.tl.predict`).
        **keys
            ``image_key``, ``shapes_key``, ``table_key``, ``library_id``.
        """
        return self._each(data, 1, device, keys, adapt)

    def embed(
        self, data: Any, *, device: str | None = None, adapt: bool = False, **keys: Any
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
            :func:`stranker.tl.predict`).
        **keys
            ``image_key``, ``shapes_key``, ``table_key``, ``library_id``.
        """
        return self._each(data, 0, device, keys, adapt)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Save weights, configuration, genes, target scaling and reference bank into folder ``path``.

        The folder is written whole: both files go into a temporary folder beside ``path``, which is
        then renamed to ``path``, so ``path`` holds the old model or the new one, never a mix (also
        when two processes save there at once). ``path`` must be absent, an empty folder, or (with
        ``overwrite=True``) a folder holding a saved model and nothing else. ``model.pt`` stores a
        checksum of ``model.json``; :meth:`load` refuses a pair that does not match.

        Parameters
        ----------
        path
            Folder to save into.
        overwrite
            Replace a model saved there before.
        """
        import hashlib
        import shutil
        import tempfile

        import torch

        from ..train.checkpoint import sync

        path = Path(path).resolve()  # a link to a model folder: the folder it points to is replaced
        check_target(path, overwrite)
        meta = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.meta.items()}
        text = json.dumps({"config": self.config.to_dict(), "genes": self.genes, "meta": meta}).encode()
        made = [p for p in path.parents if not p.exists()]  # folders this creates, deepest first
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.saving-"))
        try:
            (tmp / _META).write_bytes(text)
            torch.save(
                {"state_dict": self.aligner.state_dict(),
                 "bank": {k: torch.as_tensor(v) for k, v in self.bank.items()},
                 "feature_dim": self.meta.get("feature_dim"),
                 "meta_sha256": hashlib.sha256(text).hexdigest()},
                tmp / _FILE,
            )
            for f in (_META, _FILE):
                sync(tmp / f)
            move_into_place(tmp, path, lambda p: check_target(p, overwrite))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for p in made:  # a failed save leaves no new folder behind
                if p.exists() and not any(p.iterdir()):
                    p.rmdir()
            raise

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> Model:
        """Load a model saved with :meth:`save`.

        Nothing in the files can run code (the weights are read with ``weights_only=True``), and a
        ``model.json`` changed after saving (its checksum, stored with the weights, differs) is refused.

        Parameters
        ----------
        path
            Folder written by :meth:`save`.
        device
            Where to put the weights (default CPU; moved on use).
        """
        import hashlib
        import pickle

        import torch

        from ..model import Aligner, Config

        path = Path(path)
        if not (path / _FILE).exists() or not (path / _META).exists():
            raise FileNotFoundError(f"{path} does not hold a saved stranker model ({_FILE} and {_META}).")
        text = (path / _META).read_bytes()
        try:
            blob = torch.load(path / _FILE, map_location=device or "cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(
                f"Refusing to load {path / _FILE}: it holds objects other than tensors and plain containers, "
                f"which could run code when loaded; a model saved by stranker never does."
            ) from None
        except (RuntimeError, EOFError) as err:
            raise ValueError(
                f"{path / _FILE} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}): it is "
                f"truncated or not a stranker model. Save the model again."
            ) from None
        stored = blob.get("meta_sha256") if isinstance(blob, dict) else None
        if stored is None:
            logger.warning(f"{path} was saved without a checksum (by an older stranker): {_META} cannot be "
                           f"checked against the weights. Save it again to add one.")
        elif stored != hashlib.sha256(text).hexdigest():
            raise ValueError(
                f"{path / _META} does not match the weights in {path / _FILE} (its checksum differs): it was "
                f"edited or replaced after saving, so its genes, patch size or scaling may not be those the "
                f"weights were trained with. Restore the saved file, or fit and save the model again."
            )
        info = json.loads(text)
        cfg = Config.from_dict(info["config"])
        cfg.pretrained = False  # the weights come from the file
        cfg.weights = None
        al = Aligner(cfg, len(info["genes"]), feature_dim=blob.get("feature_dim"))
        al.load_state_dict(blob["state_dict"])
        al.eval()
        meta = info["meta"]
        for k in ("target_mean", "target_std"):
            meta[k] = np.asarray(meta[k], dtype=np.float32)
        bank = {k: v.cpu().numpy() for k, v in blob["bank"].items()}
        return cls(al, cfg, info["genes"], meta, bank)


def check_target(path: str | Path, overwrite: bool) -> None:
    """Raise :class:`FileExistsError` unless a model may be saved into folder ``path``.

    It may when ``path`` is absent or an empty folder, or, with ``overwrite``, a folder that holds a
    saved model and nothing else (a folder with other files is never replaced).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; choose another path for the model.")
    names = sorted(p.name for p in path.iterdir())
    other = [n for n in names if n not in (_FILE, _META)]
    if other:
        listed = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise FileExistsError(
            f"{path} holds files that are not a saved stranker model ({listed}); a model is saved into a new "
            f"or empty folder, or over a saved model with `overwrite=True`. Choose another path."
        )
    if names and not overwrite:
        raise FileExistsError(
            f"{path} holds a saved model ({', '.join(names)}); pass `overwrite=True` "
            f"(`stranker fit --overwrite`) to replace it."
        )
