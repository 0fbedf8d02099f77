"""A command module that registers a name the test handlers already use."""

from snakepool_worker import command


@command("echo")
def another_echo(args, ctx):
    return args
