"""md_probe's documentation-site tools: the offline site builder (`docsite.build`) and the widget snapshots
(`docsite.snapshots`). Not part of the installed package: exported from `nbs/dev/` by `tools/export_tools.py`."""
