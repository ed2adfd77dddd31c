"""`python -m hsstore.train` and `accelerate launch [--config_file ...] -m hsstore.train`: `hsstore train`."""

from .cli import main

main()
