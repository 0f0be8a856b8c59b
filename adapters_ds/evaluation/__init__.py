"""Math-reasoning evaluation: `answers` (answer extraction and scoring), `generation` (batched decoding),
`datasets` (test sets, contamination), `results` (rows, settings, summary files), `harness` (the whole run)."""
