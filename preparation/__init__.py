"""The preparation pipelines behind `python prepare.py`: files, web streams and fine-tuning records."""
