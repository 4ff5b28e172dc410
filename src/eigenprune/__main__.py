from eigenprune.cli import app

app(prog_name="eigenprune")
