//! A small English corpus, written for this project, that the tiny model's BPE tokenizer is
//! trained on. It only has to give the tokenizer realistic merges for everyday words, question
//! and answer markup and numbers; the model itself never learns from it.

pub const CORPUS: &str = "\
The morning train left the station a little after seven. Most of the people on board were \
going to work in the city, and a few were students with heavy bags full of books. \
A woman by the window was reading a letter from her brother, who lived by the sea. \
He wrote that the weather had turned cold and that the boats stayed in the harbour for days. \
The children in the village learned to swim before they learned to read. \
Q: Where does the brother live? A: He lives by the sea. \
Q: What time did the train leave? A: A little after seven. \
Q: What is the capital of the country? A: The capital is a large city on a river. \
Our garden has three apple trees, a pear tree and a long row of green beans. \
In summer the bees visit every flower, and in autumn we pick the fruit and store it in the cellar. \
My grandmother makes bread on Sundays. She says the secret is time: the dough must rest \
while you do something else, like walking the dog or writing letters. \
Numbers are useful: one, two, three, four, five, six, seven, eight, nine, ten. \
The year has twelve months and each week has seven days. 2024 was a leap year. \
Q: How many days are in a week? A: Seven. \
Q: What colour is the sky on a clear day? A: Blue. \
Q: Who wrote the letter? A: Her brother wrote it. \
Instruction: Summarise the text in one sentence. Response: A family writes letters and bakes bread. \
The engineer checked the machine, changed a part and started it again. It ran quietly for \
the rest of the night. When the sun came up, the workers came back and found everything in order. \
Computers follow instructions exactly. A program is a list of steps, and a good program is one \
that other people can read and change without fear. Tests tell us whether the steps still work. \
The library opens at nine and closes at six. You can borrow up to five books for three weeks. \
If you return a book late, you pay a small fine, which goes towards buying new books. \
The cat sat in the sun and watched the birds. The dog slept under the table. \
A red fox crossed the field at dusk, and an owl called from the old oak tree. \
Mountains are cold at the top even in summer, because the air is thin and holds little heat. \
Rivers carry water from the hills to the sea, and towns grow where rivers meet. \
The market sells fish, cheese, eggs, milk, honey, salt, rice, tea and fresh vegetables. \
People speak many languages: English, French, German, Spanish, Italian and many more. \
User: Can you help me plan a trip? Assistant: Of course. Where would you like to go, and for how long? \
User: Thank you for the answer. Assistant: You are welcome. Is there anything else? \
System: You are a helpful assistant. Answer briefly and clearly. \
";
