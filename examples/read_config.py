def read_config(path):
    f = open(path)
    lines = f.readlines()
    f.close()
    config = {}
    for line in lines:
        key, value = line.split("=")
        config[key.strip()] = value.strip()
    return config
