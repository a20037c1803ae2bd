def word_counts(path):
    f = open(path)
    text = f.read()
    f.close()
    counts = {}
    for word in text.split():
        word = word.lower()
        counts[word] = counts.get(word, 0) + 1
    return counts
