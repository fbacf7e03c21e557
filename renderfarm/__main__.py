from renderfarm.cli import main

main()
