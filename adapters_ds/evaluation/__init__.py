"""Evaluation after training, math and label tasks: `answers` (answer extraction and scoring), `labels` and
`label_scoring` (label tasks), `generation` (batched decoding), `datasets` (test sets, contamination), `loading` (the
scored model), `tensor_parallel` and `tp_adapters` (sharded evaluation), `results` and `stats` (rows, summary,
intervals), `harness` (the whole run)."""
