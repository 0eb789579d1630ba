def main(argv=None):
    print("edgecl")
