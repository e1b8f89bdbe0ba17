"""`python -m nenni_deploy.cli` is the `nenni` command."""

from . import main

main()
