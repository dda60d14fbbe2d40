"""The preparation pipelines behind `python prepare.py`: files, web streams, fine-tuning records."""
