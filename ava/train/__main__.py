"""`python -m ava.train` and `deepspeed --module ava.train`."""

from ava.train.cli import main

main()
