from bench.shapes.cli import main

main()
