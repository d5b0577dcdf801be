"""`allscore review`: a server-rendered web app where people look at flagged samples, record verdicts on cells and
sign samples off. It reads results through the analyst views and writes only the review tables."""
