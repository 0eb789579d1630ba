def main(argv=None):
    print("bench")
