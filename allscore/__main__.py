"""`python -m allscore`."""

from allscore.cli import main

main()
