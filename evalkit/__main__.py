from evalkit.cli import main

if __name__ == "__main__":  # guard: rollout workers are spawned processes that re-import __main__
    main()
