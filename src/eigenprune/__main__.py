from eigenprune.cli import main

main()
