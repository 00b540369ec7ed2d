"""Writing a merge, without torch: shards, index and the atomic output directory
(writer.py), metadata and the summary (report.py), the model card (model_card.py)."""
