"""Fine-tuning on labelled tasks: readers, labels, encoding, the task module, metrics, export, the CLI."""
