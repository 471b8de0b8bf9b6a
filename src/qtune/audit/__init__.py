"""`qtune audit`: will pruning pay on my data? Plant labelled defects into a sample of it, score it
once, and measure what each selector and rule drops (docs/audit.md). One job per module:

- `planting`: the sample and the planted defects, each labelled with its kind and spans;
- `spans`: the planted character spans as response tokens;
- `decisions`: the scored batches, and what every rule and selector decides on them;
- `verdict`: drop shares against the untouched records' with their sampling error, the sentences;
- `dynamic`: the optional short training run (`--steps`);
- `outputs`: audit.json, audit.md, audit.html and the figures;
- `run`: `run_audit(AuditConfig(...))`, the command, in that order.

The package's top level imports nothing heavy, so that `qtune --help` stays fast.
"""

