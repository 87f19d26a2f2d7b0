"""Whether a `datasets` folder (what `Dataset.save_to_disk` writes, e.g. a SAELens export) is
whole on disk. Standard library only: the Django model asks it for the card and the API."""

from __future__ import annotations

import json
from pathlib import Path

STATE_FILE = "state.json"  # save_to_disk's last file: names the Arrow data files
INFO_FILE = "dataset_info.json"


def datasets_folder_whole(path: str | Path) -> bool:
    """True when `path` holds a whole saved `datasets` folder: its state.json (readable, naming
    its data files), dataset_info.json and every data file state.json names. False when the
    folder is gone (removed by hand) or was left incomplete."""
    folder = Path(path)
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        files = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (
        bool(files)
        and (folder / INFO_FILE).is_file()
        and all((folder / name).is_file() for name in files)
    )
