"""Check an extraction's sites against the model before the job starts.

The model's real module tree is built on the meta device from its config.json (no weights, no
memory) and every site is resolved on it exactly as the GPU worker will resolve it on the loaded
model; a module path's tensor shape comes from one forward on meta tensors. A site that does not
exist is refused with a 422 naming it (and the closest module paths); the GPU worker checks
again on the loaded model before its first batch.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

from torch import nn

from mistudio.errors import Conflict, Invalid

from .ml.configs import ConfigError
from .ml.estimate import meta_model
from .ml.extract import ExtractionError, ExtractionSpec, hidden_size, site_shapes
from .ml.hooks import known_shape
from .models import Model, ModelStatus
from .selectors import model_get


@lru_cache(maxsize=4)
def _meta(config_path: str, mtime_ns: int) -> nn.Module:
    return meta_model(json.loads(Path(config_path).read_text()))


def _meta_for(model: Model) -> nn.Module:
    config = Path(model.local_path or "") / "config.json"
    try:
        return _meta(str(config), config.stat().st_mtime_ns)
    except (OSError, ValueError, ConfigError) as exc:
        raise Invalid(
            f"Cannot check the sites of {model.hf_repo_id}: its config.json cannot be read"
            f" ({exc}).",
            code="bad_site",
        ) from None


def extraction_sites(
    model: Model, *, layers: list[int], hook_types: list[str], module_sites: list[dict]
) -> list[dict]:
    """Every site of an extraction on `model`: [{name, module_path, reads, shape, d}] where
    shape is one token's tensor (e.g. [d], [n_heads, d_head]) and d its size (both None for a
    module path of a model that cannot run on meta tensors: the worker probes it).

    Raises Invalid (422, code bad_site) when a site does not exist on the model (an unknown
    module path, a block without an attention output projection …) or its tensor is not
    (batch, tokens, …) activations.
    """
    meta = _meta_for(model)
    spec = ExtractionSpec(layers=layers, hook_types=hook_types, context_size=2, batch_size=1,
                          max_samples=1, module_sites=module_sites)  # fmt: skip
    d = hidden_size(meta.config)
    try:
        sites = spec.sites(meta)
        shapes = site_shapes(meta, sites, d)
    except ExtractionError as exc:
        raise Invalid(f"{exc}.", code="bad_site") from None
    except Exception:  # noqa: BLE001 - a forward this model cannot run on meta tensors
        shapes = {site.name: known_shape(meta, site, d) for site in sites}  # module paths: None
    return [
        {
            "name": site.name,
            "module_path": site.module_path,
            "reads": site.reads,
            "shape": list(shape) if (shape := shapes[site.name]) is not None else None,
            "d": math.prod(shape) if shape is not None else None,
        }
        for site in sites
    ]


def sites_check(
    model_id: str, *, layers: list[int], hook_types: list[str], module_sites: list[dict]
) -> list[dict]:
    """`extraction_sites` of a ready model by id (NotFound 404, Conflict 409 when not ready)."""
    model = model_get(model_id)
    if model.status != ModelStatus.READY:
        raise Conflict(
            f"{model.hf_repo_id} is {model.status}; its sites are known once it is ready.",
            code="model_not_ready",
        )
    bad = [i for i in layers if i >= (model.num_layers or 0)]
    if bad:
        raise Invalid(
            f"Layers {bad} do not exist: {model.name} has layers 0–{(model.num_layers or 1) - 1}.",
            code="bad_layers",
        )
    return extraction_sites(model, layers=layers, hook_types=hook_types, module_sites=module_sites)
