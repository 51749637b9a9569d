"""Screening many backbones on the user's data (issue 32, in progress): the shipped zoos (``zoo``) and LogME, a
ranking without training (``logme``)."""
