"""Images: scikit-learn's digits as a data set, the decoded-image cache, and the loaders of an
ImageFolder tree, the digits or synthetic images with a model's timm data config.
"""
